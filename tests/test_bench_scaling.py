"""scripts/bench_scaling.py end to end on a tiny random model: every (model, seq_length, tool) cell is
measured in its own process and lands in the JSON and the table, the `scaling` section is written between
its markers with the rest of a copy of docs/benchmarks.md kept byte for byte (and rewritten in place, not
appended twice), and a cell past its time or memory limit is stopped and says so."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from conftest import write_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench_hf  # noqa: E402  (scripts/ on the path)
import bench_scaling  # noqa: E402


def tiny_models(tmp_path: Path) -> dict:
    from tokenizers import Tokenizer

    tok = write_tiny_tokenizer(tmp_path / "tokenizer")
    vocab = Tokenizer.from_file(str(tok / "tokenizer.json")).get_vocab_size()
    shape = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": vocab, "tie_word_embeddings": False, "rope_theta": 10000.0}
    return {"tiny": {"title": "tiny: 2 layers, random weights", "shape": shape, "tokenizer": str(tok)}}


def test_bench_scaling_writes_every_cell_and_keeps_the_rest_of_the_doc(tmp_path):
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    committed = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    start, end_marker = committed.find("<!-- section: scaling -->"), "<!-- end of section -->"
    if start >= 0:  # the committed file holds a real run's section: cut it, so the first write appends one
        end = committed.index(end_marker, start) + len(end_marker)
        committed = committed[:start].rstrip("\n") + "\n" + committed[end:].lstrip("\n")
    doc.write_text(committed, encoding="utf-8")
    before = doc.read_text(encoding="utf-8")
    assert "<!-- section: scaling -->" not in before and "<!-- section: qlora-bench -->" in before
    rc = bench_scaling.main(["--models", "tiny", "--lengths", "512,256", "--quantized-lengths", "256", "--steps", "1",
                             "--records", "16",
                             "--threads", "1", "--out", str(tmp_path / "work"), "--doc", str(doc)],
                            models=tiny_models(tmp_path))
    assert rc == 0

    report = json.loads((doc.parent / "benchmarks_scaling.json").read_text())
    cells = {(c["model"], c["seq_length"], c["tool"]): c for c in report["cells"]}
    assert sorted(cells) == sorted([("tiny", n, t) for n in (256, 512) for t in ("petformers", "hf_peft_grouped")]
                                   + [("tiny", 256, "petformers_nf4")])  # the NF4 base at --quantized-lengths only
    for (_, length, tool), c in cells.items():
        assert "error" not in c, c
        assert c["steps_timed"] == 1 and c["trained_tokens_per_s"] > 0 and c["seconds_per_step"] > 0
        assert 50 < c["peak_rss_mib"] < 16 * 1024
        if tool == "hf_peft_grouped":  # a micro-batch never pads past a row's budget
            assert 0 < c["positions_per_step"] <= length
    assert report["load_average"].keys() == {"before", "after"} and report["started"] <= report["ended"]
    assert report["settings"]["lengths"] == [256, 512]

    text = doc.read_text(encoding="utf-8")
    assert text.startswith(before.rstrip("\n"))  # the rest of the file, untouched
    section = text[text.index("<!-- section: scaling -->"):]
    assert section.rstrip().endswith("<!-- end of section -->")
    assert text.count("<!-- section: scaling -->") == 1
    for c in cells.values():
        assert f"| {c['seq_length']} | " in section and f"{c['trained_tokens_per_s']:.1f}" in section
        assert c["command"] in section
    assert "**What grows**" in section and "tokens/s at 512 as at 256" in section
    assert "petformers against transformers + peft, cell by cell (2 pairs)" in section
    assert "| tiny | 256 | petformers (NF4 base) |" in section and "tiny at 256, the NF4 base against" in section
    nf4_log = (tmp_path / "work" / "cells" / "tiny_256_petformers_nf4" / "log.txt").read_text()
    assert "base held quantized (nf4 4-bit, double quantization)" in nf4_log  # the cell measured what it names

    # A second write replaces the section where it is.
    bench_scaling.write_section(doc, bench_scaling.SECTION, bench_scaling.render(report))
    assert doc.read_text(encoding="utf-8") == text


def test_a_cell_past_its_limits_is_stopped_and_says_so(tmp_path):
    args = argparse.Namespace(steps=1, threads=1, cell_time_limit=1.0)
    ctx = {"args": args, "out": tmp_path, "train": tmp_path / "train.jsonl", "hf_dtype": "fp32",
           "memory_limit_mib": None, "checkpoints": {"tiny": tmp_path / "model"}}
    cell = bench_scaling.run_cell("tiny", 256, "petformers", ctx)
    assert cell["error"] == "timed out after 1 s" and cell["wall_s"] < 30

    args.cell_time_limit = 120.0
    ctx["memory_limit_mib"] = 40.0  # importing torch alone passes it
    cell = bench_scaling.run_cell("tiny", 256, "hf_peft_grouped", ctx)
    assert cell["error"] == "stopped at the memory limit (40 MiB resident)"


def test_budget_micro_batches_never_pad_past_the_row():
    """bench_hf --max-positions: neighbours of the sample order, as many as fit once padded to the longest;
    a sample longer than the budget goes alone (the real data is truncated to seq_length first)."""
    lengths = [500, 480, 300, 290, 250, 100, 90, 80, 70, 600]
    batches = list(bench_hf.budget_batches(iter(range(len(lengths))), lengths, 512))
    assert batches == [[0], [1], [2], [3], [4, 5], [6, 7, 8], [9]]
    assert all(len(b) * max(lengths[i] for i in b) <= 512 for b in batches[:-1])


def test_the_default_grid_is_two_axes_through_the_first_model():
    """`--grid axes`: the first model at every length, every model at the axis length, no other cell (the
    1.1b at 4096 alone would take most of an hour a step on 2 cores); `--grid cross` keeps every pair."""
    names, lengths = ["135m", "360m", "1.1b"], [512, 1024, 2048, 4096]
    assert bench_scaling.cells_of(names, lengths, "axes", 1024) == [
        ("135m", 512), ("135m", 1024), ("135m", 2048), ("135m", 4096), ("360m", 1024), ("1.1b", 1024)]
    assert len(bench_scaling.cells_of(names, lengths, "cross", 1024)) == 12
    assert "every model at 1024" in bench_scaling.grid_text({"grid": "axes", "models": names, "axis_length": 1024})


def test_an_axis_length_outside_the_lengths_is_refused(capsys):
    rc = bench_scaling.main(["--models", "135m,360m", "--lengths", "512,2048", "--axis-length", "1024"])
    assert rc == 2 and "--axis-length (one of --lengths)" in capsys.readouterr().err
