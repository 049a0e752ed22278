"""scripts/bench_qlora.py --quick end to end into a temporary docs directory: every row of the QLoRA
comparison is measured (or names the error it gave), its section is written between its markers and the
rest of benchmarks.md is kept byte for byte, and the numbers are sane (the GGUF-kept base computes with
the very blocks the float32 base was dequantized from, so its held-out loss is (a)'s)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_qlora_quick_writes_its_section_and_keeps_the_rest(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    before = ("# Benchmarks\n\nkept text\n\n<!-- section: qlora-7b -->\nanother script's section\n"
              "<!-- end of section -->\n")
    (docs / "benchmarks.md").write_text(before, encoding="utf-8")
    cmd = [sys.executable, str(REPO / "scripts" / "bench_qlora.py"), "--quick", "--eval-records", "4",
           "--seq-length", "256", "--batch-size", "2", "--micro-batch", "2", "--threads", "1",
           "--out", str(tmp_path / "work"), "--docs", str(docs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    text = (docs / "benchmarks.md").read_text(encoding="utf-8")
    assert text.startswith(before.rstrip("\n"))  # the file's own text and the other section, untouched
    section = text[text.index("<!-- section: qlora-bench -->"):]
    assert section.rstrip().endswith("<!-- end of section -->") and section.count("<!-- end of section -->") == 1
    for title in ("(a) petformers, float32 base", "(b) petformers, Q4_1 GGUF blocks kept", "(c) petformers, NF4",
                  "(d) transformers + peft + bitsandbytes 4-bit NF4", "(e) transformers + peft, float32 base"):
        assert title in section, title

    report = json.loads((docs / "benchmarks_qlora.json").read_text())
    runs = report["runs"]
    assert sorted(runs) == sorted(["float32", "gguf", "nf4", "hf_bnb_nf4", "hf_float32"])
    for name, row in runs.items():
        if name == "hf_bnb_nf4" and "error" in row:  # bitsandbytes cannot run here: its one line is recorded
            assert row["error"] and f"could not run: `{row['error']}`" in section
            continue
        assert "error" not in row, (name, row)
        assert math.isfinite(row["eval_loss"]) and 0.1 < row["eval_loss"] < 10, (name, row["eval_loss"])
        assert 100 < row["peak_rss_mib"] < 64 * 1024 and row["trained_tokens_per_s"] > 0
        assert 0 <= row["dequant_share"] < 1
    assert runs["float32"]["dequant_share"] == 0 and runs["hf_float32"]["dequant_share"] == 0
    for name in ("gguf", "nf4"):  # forward and backward dequantize every step
        assert runs[name]["dequant_share"] > 0 and runs[name]["dequant_calls"] > 0
    assert abs(runs["gguf"]["eval_loss_vs_float32"]) < 1e-4
    assert runs["float32"]["eval_loss_vs_float32"] == 0
    assert f"{runs['nf4']['eval_loss']:.4f}" in section
