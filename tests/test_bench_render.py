"""`scripts/bench.py --render` writes benchmarks.md again from the last run's benchmarks.json: every figure
stays that run's (the tables are unchanged), the sections other scripts wrote are kept, and the paragraph
on why the run stays below the matmul peak is computed from that run's profiled step."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench  # noqa: E402  (scripts/ on the path)


def _table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ")]


def test_render_keeps_the_runs_figures_and_explains_the_gap_to_the_peak(tmp_path):
    for name in ("benchmarks.md", "benchmarks.json"):
        shutil.copyfile(REPO / "docs" / name, tmp_path / name)
    before = (tmp_path / "benchmarks.md").read_text(encoding="utf-8")
    assert bench.main(["--render", "--docs", str(tmp_path)]) == 0
    after = (tmp_path / "benchmarks.md").read_text(encoding="utf-8")

    assert _table_rows(after) == _table_rows(before)  # no figure moved
    assert after.count("<!-- section:") == before.count("<!-- section:")

    ops = json.loads((REPO / "docs" / "benchmarks.json").read_text())["levers"]["profile"]["ops"]
    share = {op["op"]: op["share"] for op in ops}
    matmul = sum(v for k, v in share.items() if k in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"))
    attention = sum(v for k, v in share.items() if k.startswith("aten::_scaled_dot_product"))
    why = next(line for line in after.splitlines() if line.startswith("**Why below the peak**"))
    assert f"take {100 * matmul:.0f}% of its operator time" in why
    assert f"attention kernels take {100 * attention:.0f}%" in why
    assert f"random masks for the LoRA inputs {100 * share['aten::bernoulli_']:.0f}%" in why
