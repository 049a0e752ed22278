"""Generation metrics against values worked out by hand (and rouge-score's published example),
perplexity, and the metrics.jsonl log with its loss plot."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys

import pytest

from petformers.errors import DataError
from petformers.eval.metrics import (bleu4, exact_match, f1, generation_metrics, lcs_length, normalize_answer,
                                     perplexity, rouge_l, tokenize)
from petformers.train.metrics_log import MetricsLog, loss_figure, plot_loss, read_metrics


# --- tokenization and normalisation -------------------------------------------------------------

def test_tokenize_latin_words_cjk_characters():
    assert tokenize("The quick, brown fox!") == ["the", "quick", "brown", "fox"]
    assert tokenize("我喜欢猫。") == ["我", "喜", "欢", "猫"]
    assert tokenize("用Python写代码") == ["用", "python", "写", "代", "码"]
    assert tokenize("カタカナ") == ["カ", "タ", "カ", "ナ"]
    assert tokenize("ＡＢＣ１２３") == ["abc123"]  # full-width folded by NFKC


def test_normalize_answer_and_exact_match():
    assert normalize_answer("  Hello \n\t World  ") == "hello world"
    assert exact_match("Hello   WORLD", " hello world\n") == 1.0
    assert exact_match("hello world.", "hello world") == 0.0  # punctuation is kept on purpose
    assert exact_match("", "") == 1.0
    assert exact_match("a", "b") == 0.0


# --- ROUGE-L ------------------------------------------------------------------------------------

def test_rouge_l_by_hand():
    # rouge-score README: target "The quick brown fox jumps over the lazy dog" (9 tokens),
    # prediction "The quick brown dog jumps on the log." (8 tokens).
    # LCS = "the quick brown jumps the" = 5  ->  P = 5/8, R = 5/9, F = 2PR/(P+R) = 10/17
    # (published: rougeL fmeasure 0.5882352941176471).
    pred, ref = "The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog"
    assert lcs_length(tokenize(pred), tokenize(ref)) == 5
    assert rouge_l(pred, ref) == pytest.approx(10 / 17)
    assert rouge_l(pred, ref) == pytest.approx(0.5882352941176471)
    # "the cat was found under the bed" (7) vs "the cat was under the bed" (6): LCS 6,
    # P = 6/7, R = 1, F = 12/13.
    assert rouge_l("the cat was found under the bed", "the cat was under the bed") == pytest.approx(12 / 13)


def test_rouge_l_identical_disjoint_empty():
    assert rouge_l("Some answer here", "some  answer HERE") == 1.0
    assert rouge_l("alpha beta", "gamma delta") == 0.0
    assert rouge_l("", "something") == 0.0
    assert rouge_l("", "") == 1.0


def test_rouge_l_chinese_by_character():
    # 我 喜 欢 猫 vs 我 喜 欢 狗: LCS 3 of 4 each way -> 3/4. Whole-word tokens would give 0.
    assert rouge_l("我喜欢猫", "我喜欢狗") == pytest.approx(0.75)
    # 今 天 天 气 很 好 (6) vs 今 天 天 气 不 错 (6): LCS 4 -> 4/6.
    assert rouge_l("今天天气很好", "今天天气不错") == pytest.approx(4 / 6)


# --- F1 -----------------------------------------------------------------------------------------

def test_f1_token_overlap():
    # Shared multiset: the×2 quick brown dog jumps = 6; P = 6/8, R = 6/9 -> 12/17
    # (rouge-score's published rouge1 fmeasure for the same pair: 0.7058823529411765).
    assert f1("The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog") \
        == pytest.approx(12 / 17)
    assert f1("blue whale", "Blue Whale") == 1.0
    assert f1("x y", "z w") == 0.0
    assert f1("我喜欢猫", "我喜欢狗") == pytest.approx(0.75)


# --- BLEU-4 -------------------------------------------------------------------------------------

def test_bleu4_by_hand():
    # hyp "the cat sat on a mat" vs ref "the cat sat on the mat", 6 tokens each (BP = 1):
    # 1-grams 5/6, 2-grams 3/5 (the cat, cat sat, sat on), 3-grams 2/4, 4-grams 1/3 (the cat sat on).
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu4(["the cat sat on a mat"], ["the cat sat on the mat"]) == pytest.approx(expected)
    assert expected == pytest.approx(0.537284965911771)


def test_bleu4_brevity_penalty():
    # Every n-gram of "the cat sat on" matches; c = 4 < r = 6 -> BP = exp(1 - 6/4).
    assert bleu4(["the cat sat on"], ["the cat sat on the mat"]) == pytest.approx(math.exp(-0.5))


def test_bleu4_exp_smoothing():
    # hyp "the cat on the mat" (5) vs ref "the cat sat on the mat" (6):
    # 1-grams 5/5, 2-grams 3/4 (the cat, on the, the mat), 3-grams 1/3 (on the mat), 4-grams 0/2
    # -> smoothed to 1/(2·2); BP = exp(1 - 6/5). BLEU = exp(-0.2) · (1 · 3/4 · 1/3 · 1/4)^(1/4).
    expected = math.exp(-0.2) * (3 / 4 * 1 / 3 * 1 / 4) ** 0.25
    assert bleu4(["the cat on the mat"], ["the cat sat on the mat"]) == pytest.approx(expected)


def test_bleu4_is_corpus_level_not_a_mean():
    # Counts are pooled: 1-grams 4/6, 2-grams 3/4, 3-grams 2/2, 4-grams 1/1, c = r = 6.
    # (The mean of sentence BLEUs would be (1 + 0) / 2.)
    score = bleu4(["a b c d", "x y"], ["a b c d", "z w"])
    assert score == pytest.approx((4 / 6 * 3 / 4) ** 0.25)


def test_bleu4_identical_disjoint_short():
    assert bleu4(["one two three four five"], ["One two, three four five."]) == pytest.approx(1.0)
    assert bleu4(["alpha beta gamma delta"], ["one two three four"]) == 0.0
    assert bleu4(["too short"], ["too short"]) == 0.0  # no 4-grams at all: undefined, 0 as in sacrebleu
    assert bleu4(["我喜欢猫"], ["我喜欢猫"]) == pytest.approx(1.0)  # 4 characters = 4 tokens
    with pytest.raises(ValueError):
        bleu4(["a"], [])


def test_generation_metrics_keys_and_means():
    preds = ["The answer is 42", "我喜欢猫"]
    refs = ["the answer is 42", "我喜欢狗"]
    m = generation_metrics(preds, refs)
    assert set(m) == {"exact_match", "rouge_l", "bleu4", "f1"}
    assert m["exact_match"] == pytest.approx(0.5)
    assert m["rouge_l"] == pytest.approx((1.0 + 0.75) / 2)
    assert m["f1"] == pytest.approx((1.0 + 0.75) / 2)
    # Pooled: 1-grams 7/8, 2-grams 5/6, 3-grams 3/4, 4-grams 1/2; c = r = 8.
    assert m["bleu4"] == pytest.approx((7 / 8 * 5 / 6 * 3 / 4 * 1 / 2) ** 0.25)
    assert all(0.0 <= v <= 1.0 for v in m.values())
    with pytest.raises(ValueError):
        generation_metrics([], [])


def test_perplexity_is_exp_mean_loss():
    assert perplexity(6.0, 3) == pytest.approx(math.exp(2.0))
    losses = [2.3, 1.7, 0.4, 3.1]
    assert perplexity(sum(losses), len(losses)) == pytest.approx(math.exp(sum(losses) / len(losses)))
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


# --- metrics.jsonl and the loss plot ------------------------------------------------------------

def test_metrics_log_round_trip(tmp_path):
    import torch

    path = tmp_path / "sub" / "metrics.jsonl"
    with MetricsLog(path) as ml:
        ml.write({"step": 1, "loss": 2.5, "lr": 1e-4})
        ml.write({"step": 2, "loss": torch.tensor(2.25), "note": "中文"})
    with MetricsLog(path) as ml:  # a resumed run appends
        ml.write({"step": 2, "eval_loss": 2.0})
    assert read_metrics(path) == [{"step": 1, "loss": 2.5, "lr": 1e-4}, {"step": 2, "loss": 2.25, "note": "中文"},
                                  {"step": 2, "eval_loss": 2.0}]


def test_metrics_log_survives_sigkill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    code = ("import os, signal\n"
            "from petformers.train.metrics_log import MetricsLog\n"
            f"ml = MetricsLog({str(path)!r})\n"
            "for s in range(3): ml.write({'step': s, 'loss': 1.0 / (s + 1)})\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2]


def test_read_metrics_cut_off_last_line_and_bad_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo', encoding="utf-8")
    assert read_metrics(path) == [{"step": 1, "loss": 1.0}]
    path.write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 3, "loss": 0.5}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"metrics.jsonl:2"):
        read_metrics(path)
    with pytest.raises(DataError, match="no such metrics file"):
        read_metrics(tmp_path / "missing.jsonl")


def test_plot_loss(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as ml:
        for step in range(1, 21):
            ml.write({"step": step, "loss": 3.0 / step, "lr": 1e-4})
            if step % 10 == 0:
                ml.write({"step": step, "eval_loss": 3.5 / step})
        ml.write({"step": 20, "loss": float("nan")})  # a NaN record is not drawn
    png = tmp_path / "loss.png"
    assert plot_loss(path, png) == png
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    fig = loss_figure(read_metrics(path), title="my run")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "step" and ax.get_ylabel().startswith("loss")
    assert ax.get_title() == "my run"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train loss", "eval loss"]
    train, evals = ax.get_lines()
    assert list(train.get_xdata()) == list(range(1, 21))
    assert train.get_ydata()[-1] == pytest.approx(3.0 / 20)  # NaN record ignored, step 20 keeps 0.15
    assert list(evals.get_xdata()) == [10, 20]


def test_plot_loss_without_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("", encoding="utf-8")
    plot_loss(path, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0
