"""`petformers report`: a real run directory built in tmp (JSON files, metrics.jsonl, loss.png drawn by
plot_loss, metrics computed by the real metric functions) rendered through the CLI."""

from __future__ import annotations

import base64
import html
import json

import pytest

from petformers.cli.main import main
from petformers.errors import PetformersError
from petformers.eval.metrics import generation_metrics, perplexity
from petformers.report import METRIC_DESCRIPTIONS, render_report, write_report
from petformers.train.metrics_log import MetricsLog, plot_loss

EVIL_PROMPT = "Explain <script>alert('x')</script> & \"quotes\""
SAMPLES = [
    {"prompt": EVIL_PROMPT, "reference": "It is a script tag."},
    {"prompt": "What is the SKU of the Zorblax 3000?", "reference": "ZBX-3000-A"},
    {"prompt": "翻译：你好", "reference": "Hello"},
]
BEFORE_PREDICTIONS = ["I cannot help with <b>that</b>.", "The SKU is ZBX-3000-B, I think.", "你好"]
AFTER_PREDICTIONS = ["It is a script tag.", "ZBX-3000-A", "Hello"]


def _fmt(v: float) -> str:
    return str(round(v, 4))


def _write_eval(path, predictions, eval_loss, token_count=40):
    refs = [s["reference"] for s in SAMPLES]
    metrics = generation_metrics(predictions, refs)
    metrics["eval_loss"] = eval_loss
    metrics["perplexity"] = perplexity(eval_loss * token_count, token_count)
    samples = [dict(s, prediction=p) for s, p in zip(SAMPLES, predictions)]
    path.write_text(json.dumps({"metrics": metrics, "samples": samples}, ensure_ascii=False), encoding="utf-8")
    return metrics


def make_run(run):
    run.mkdir()
    (run / "resolved_config.yaml").write_text(
        "seed: 0\nrunner_config:\n  epochs: 2\n  batch_size: 4\nmodel:\n  model_config:\n"
        "    pet_config: {pet_type: lora, lora_rank: 8, lora_alpha: 16}\n", encoding="utf-8")
    (run / "data_summary.json").write_text(json.dumps(
        {"train_records": 180, "eval_records": 20, "train_tokens": 23456, "template": "chatml"}), encoding="utf-8")
    with MetricsLog(run / "metrics.jsonl") as ml:
        for step in range(1, 31):
            ml.write({"step": step, "loss": 2.8 / step ** 0.5, "lr": 1e-4})
            if step % 10 == 0:
                ml.write({"step": step, "eval_loss": 3.0 / step ** 0.5})
    plot_loss(run / "metrics.jsonl", run / "loss.png")
    before = _write_eval(run / "eval_before.json", BEFORE_PREDICTIONS, eval_loss=2.9123)
    after = _write_eval(run / "eval_after.json", AFTER_PREDICTIONS, eval_loss=0.5432)
    (run / "run_summary.json").write_text(json.dumps(
        {"steps": 30, "train_runtime_s": 123.4, "tokens_per_s": 987.6, "final_loss": 0.51}), encoding="utf-8")
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    return before, after


def test_report_cli_full_run(tmp_path, capsys):
    run = tmp_path / "run1"
    before, after = make_run(run)
    assert main(["report", "--output_dir", str(run)]) == 0
    report = run / "report.html"
    assert capsys.readouterr().out.strip() == str(report.resolve())
    text = report.read_text(encoding="utf-8")

    # Every metric it was given, by name, meaning and value, before and after.
    assert set(before) == {"exact_match", "rouge_l", "bleu4", "f1", "eval_loss", "perplexity"}
    for name in before:
        assert f"<code>{name}</code>" in text
        assert html.escape(METRIC_DESCRIPTIONS[name]) in text
        assert _fmt(before[name]) in text and _fmt(after[name]) in text
    assert after["exact_match"] == 1.0 and before["exact_match"] == 0.0 and 0 < before["rouge_l"] < 1
    assert "+1.0000" in text  # exact_match change

    # The loss plot is embedded byte for byte; nothing is fetched from outside.
    png = base64.b64encode((run / "loss.png").read_bytes()).decode("ascii")
    assert f'src="data:image/png;base64,{png}"' in text
    assert "<script" not in text and "<link" not in text and "http://" not in text and "https://" not in text

    # Sample text is escaped, side by side.
    assert html.escape(EVIL_PROMPT) in text
    assert html.escape("I cannot help with <b>that</b>.") in text and "<b>that</b>" not in text
    assert "ZBX-3000-A" in text and "翻译：你好" in text

    # Config, data summary, run summary, loss stats and artefacts.
    assert "lora_rank: 8" in text
    assert "train_records" in text and "23456" in text and "chatml" in text
    assert "train_runtime_s" in text and "123.4" in text and "987.6" in text
    assert _fmt(2.8 / 30 ** 0.5) in text  # last train loss
    for name in ("adapter/", "metrics.jsonl", "loss.png", "eval_after.json"):
        assert f"<code>{name}</code>" in text
    assert "not available" not in text


def test_report_missing_pieces_never_crash(tmp_path):
    run = tmp_path / "half"
    run.mkdir()
    text = render_report(run)
    assert text.count("not available") >= 6
    # Loss curve drawn from metrics.jsonl when loss.png is missing; a broken eval file is reported.
    with MetricsLog(run / "metrics.jsonl") as ml:
        ml.write({"step": 1, "loss": 2.0})
        ml.write({"step": 2, "loss": 1.5})
    (run / "eval_after.json").write_text('{"metrics": {', encoding="utf-8")
    (run / "eval_before.json").write_text(json.dumps(
        {"metrics": {"exact_match": 0.05}, "samples": [{"prompt": "p<1>", "reference": "r", "prediction": "q"}]}),
        encoding="utf-8")
    (run / "run_summary.json").write_text("[1, 2]", encoding="utf-8")
    out = write_report(run)
    text = out.read_text(encoding="utf-8")
    assert 'src="data:image/png;base64,' in text and "drawn from metrics.jsonl" in text
    assert "eval_after.json: invalid JSON at line 1" in text
    assert "<code>exact_match</code>" in text and "0.05" in text
    assert "p&lt;1&gt;" in text
    assert not (run / "report.html.tmp").exists()


def test_report_aligns_samples_by_prompt(tmp_path):
    run = tmp_path / "shuffled"
    run.mkdir()
    before = [{"prompt": f"q{i}", "reference": f"a{i}", "prediction": f"before{i}"} for i in range(3)]
    after = [{"prompt": f"q{i}", "reference": f"a{i}", "prediction": f"a{i}"} for i in (2, 0, 1)]
    (run / "eval_before.json").write_text(json.dumps({"metrics": {}, "samples": before}), encoding="utf-8")
    (run / "eval_after.json").write_text(json.dumps({"metrics": {}, "samples": after}), encoding="utf-8")
    text = render_report(run)
    rows = [r for r in text.split("<tr>") if ">q" in r]
    assert len(rows) == 3
    for row, i in zip(rows, (2, 0, 1)):  # in the after order, each with its own before prediction
        assert f">q{i}<" in row and f"before{i}" in row and f">a{i}<" in row


def test_report_missing_run_dir_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope"
    with pytest.raises(PetformersError, match="no such run directory"):
        write_report(missing)
    assert main(["report", "--output_dir", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "no such run directory" in err and str(missing) in err and "Traceback" not in err
