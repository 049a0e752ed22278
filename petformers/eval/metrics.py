"""Generation metrics (exact match, token F1, ROUGE-L, BLEU-4) and perplexity, in plain Python.

No nltk / rouge-score / sacrebleu: they are not dependencies, and their default tokenizers drop or
glue Chinese text (rouge-score keeps only [a-z0-9], sacrebleu's 13a keeps a run of Han characters
as one "word"), so a Chinese answer would score 0 or be judged all-or-nothing.

Tokenization (`tokenize`), shared by F1, ROUGE-L and BLEU-4: the text is NFKC-normalised (full-width
letters and digits become ASCII) and lower-cased; every CJK character (Han, Hiragana, Katakana) is a
token of its own; every other run of letters, digits and underscores is a word token; punctuation
and whitespace separate tokens and are dropped. "用Python写代码。" -> 用 python 写 代 码.

All scores are fractions in [0, 1].
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Sequence

# Hiragana + Katakana, CJK extension A, CJK unified ideographs, compatibility ideographs,
# and the supplementary ideographic planes (extensions B and later).
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


def tokenize(text: str) -> list[str]:
    """Tokens as the module docstring defines them: CJK characters one by one, other words whole."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def normalize_answer(s: str) -> str:
    """`s` NFKC-normalised, lower-cased, stripped, and with every run of whitespace made one space.

    Punctuation and articles are kept (unlike SQuAD's normaliser): the answers petformers checks are
    often a strict output format, where a missing full stop or bracket is a real mistake.
    """
    return " ".join(unicodedata.normalize("NFKC", s).lower().split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when `normalize_answer(pred) == normalize_answer(ref)`, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(ref))


def f1(pred: str, ref: str) -> float:
    """SQuAD-style token-overlap F1: 2·P·R/(P+R) over the multiset of shared tokens.

    Two texts without any token score 1.0 (they agree); one empty and one not scores 0.0.
    """
    p, r = tokenize(pred), tokenize(ref)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, O(len(a)·len(b)) time, O(len(b)) memory."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure (beta = 1), as rouge-score's `rougeL`: P = LCS/len(pred), R = LCS/len(ref),
    F = 2·P·R/(P+R).

    Two texts without any token score 1.0 (rouge-score would say 0.0; here identical texts always
    score 1.0); one empty and one not scores 0.0.
    """
    p, r = tokenize(pred), tokenize(ref)
    if not p or not r:
        return float(p == r)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu4(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU-4 (one reference per prediction), as sacrebleu's `corpus_bleu` defines it.

    Clipped n-gram matches and n-gram totals (n = 1..4) are summed over the whole corpus, then
    BLEU = BP · exp(mean_n log p_n) with uniform weights 1/4, and the brevity penalty
    BP = exp(1 - r/c) when the total prediction length c is below the total reference length r
    (0 when c = 0), else 1.

    Smoothing is sacrebleu's default "exp" (NIST, Chen & Cherry 2014 method 3): an order with no
    match gets p_n = 1 / (2^k · total_n), k counting such orders 1, 2, 3 ...; so a single missing
    4-gram match does not zero the score of a small eval set. As in sacrebleu, no match of any order,
    or an order with no n-grams at all (every prediction shorter than n tokens), gives 0.0.
    """
    if len(preds) != len(refs):
        raise ValueError(f"bleu4: {len(preds)} predictions but {len(refs)} references")
    correct, total = [0] * 4, [0] * 4
    pred_len = ref_len = 0
    for pred, ref in zip(preds, refs):
        p, r = tokenize(pred), tokenize(ref)
        pred_len += len(p)
        ref_len += len(r)
        for n in range(1, 5):
            p_ngrams, r_ngrams = _ngrams(p, n), _ngrams(r, n)
            total[n - 1] += sum(p_ngrams.values())
            correct[n - 1] += sum((p_ngrams & r_ngrams).values())
    if pred_len == 0 or not any(correct) or not all(total):
        return 0.0
    log_sum, halvings = 0.0, 0
    for c, t in zip(correct, total):
        if c == 0:
            halvings += 1
            log_sum += math.log(1.0 / (2 ** halvings * t))
        else:
            log_sum += math.log(c / t)
    brevity = 1.0 if pred_len >= ref_len else math.exp(1.0 - ref_len / pred_len)
    return brevity * math.exp(log_sum / 4)


def generation_metrics(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """{"exact_match", "rouge_l", "f1"}: means over the pairs; {"bleu4"}: corpus-level. All in [0, 1]."""
    if len(preds) != len(refs):
        raise ValueError(f"generation_metrics: {len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise ValueError("generation_metrics: no predictions to score")
    n = len(preds)
    return {
        "exact_match": sum(exact_match(p, r) for p, r in zip(preds, refs)) / n,
        "rouge_l": sum(rouge_l(p, r) for p, r in zip(preds, refs)) / n,
        "bleu4": bleu4(preds, refs),
        "f1": sum(f1(p, r) for p, r in zip(preds, refs)) / n,
    }


def perplexity(total_loss_sum: float, total_tokens: int) -> float:
    """exp(mean token loss): `total_loss_sum` is the summed (not averaged) cross-entropy in nats over
    `total_tokens` scored tokens. inf when the mean loss overflows exp."""
    if total_tokens <= 0:
        raise ValueError(f"perplexity: no scored tokens (total_tokens={total_tokens})")
    try:
        return math.exp(float(total_loss_sum) / total_tokens)
    except OverflowError:
        return math.inf
