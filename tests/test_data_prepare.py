"""Tokenizing conversations into rows: masks, templates, packing, truncation, output files, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import write_tiny_tokenizer
from petformers.checkpoint.load import load_pretrained, load_tokenizer
from petformers.cli.main import main
from petformers.data.dataset import PreparedDataset, check_tokenizer
from petformers.data.formats import alpaca_prompt, load_samples
from petformers.data.prepare import prepare, prepare_text
from petformers.data.templates import VICUNA_SYSTEM, render_prompt
from petformers.errors import DataError

MULTI_TURN = {"conversations": [
    {"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4."},
    {"from": "human", "value": "And in French, with emoji?"}, {"from": "gpt", "value": "Quatre 🎉 (\"quatre\")."}]}
CHINESE = {"instruction": "把这句话翻译成英文。", "input": "你好，世界！", "output": "Hello, world! 你好 🌍 مرحبا"}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def conv(rec: dict) -> dict:
    """An Alpaca record as a conversation record (a file holds one format)."""
    return {"conversations": [{"from": "human", "value": alpaca_prompt(rec["instruction"], rec["input"])},
                              {"from": "gpt", "value": rec["output"]}]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def samples_of(row: dict, pad_id: int) -> list[dict]:
    """Split a row into its samples: input ids, and per token the label it was trained on (or -100)."""
    out = []
    for seg in np.unique(row["segment_ids"]):
        idx = np.nonzero(row["segment_ids"] == seg)[0]
        ids, targets = row["input_ids"][idx], row["targets"][idx]
        if (ids == pad_id).all() and (targets == -100).all():
            continue  # the padding segment
        assert (row["position_ids"][idx] == np.arange(len(idx))).all()
        assert targets[-1] == -100  # nothing predicted across a sample boundary
        labels = np.concatenate([[-100], targets[:-1]])
        assert ((labels == -100) | (labels == ids)).all()  # a target is the next input token
        out.append({"ids": ids, "labels": labels, "start": idx[0], "end": idx[-1] + 1})
    return out


def split_decode(tokenizer, sample) -> tuple[str, str]:
    trained = sample["labels"] != -100
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    return decode(sample["ids"][~trained]), decode(sample["ids"][trained])


def test_fastchat_masks_exactly_the_prompt(tmp_path, tok, alpaca_demo):
    records = json.loads(alpaca_demo.read_text(encoding="utf-8"))[:25]
    path = write_jsonl(tmp_path / "a.jsonl", [conv(r) for r in records] + [MULTI_TURN])
    ds, summary = prepare(path, tok, 2048, template="fastchat", progress=False)
    assert (summary.records, summary.samples, summary.rows, summary.truncated) == (26, 26, 26, 0)
    eos = tok.eos_token
    for i, rec in enumerate(records):
        (sample,) = samples_of(ds[i], tok.pad_id)
        masked, trained = split_decode(tok, sample)
        prompt = alpaca_prompt(rec["instruction"], rec["input"])
        assert masked == f"{VICUNA_SYSTEM} USER: {prompt} ASSISTANT:"
        assert trained == " " + rec["output"] + eos  # the separator space leads the answer's first token
        # MindFormers tokenizes each round whole and puts eos in place of </s>: the same ids.
        assert sample["ids"].tolist() == tok.encode(f"{masked} {rec['output']}") + [tok.eos_id]
    (sample,) = samples_of(ds[25], tok.pad_id)
    masked, trained = split_decode(tok, sample)
    t = [c["value"] for c in MULTI_TURN["conversations"]]
    assert masked == f"{VICUNA_SYSTEM} USER: {t[0]} ASSISTANT:USER: {t[2]} ASSISTANT:"  # every user turn masked
    assert trained == f" {t[1]}{eos} {t[3]}{eos}"
    assert render_prompt([{"role": "user", "content": t[0]}], "fastchat", tok) == \
        f"{VICUNA_SYSTEM} USER: {t[0]} ASSISTANT:"


def test_alpaca_and_chat_templates(tmp_path, tok):
    path = write_jsonl(tmp_path / "zh.jsonl", [conv(CHINESE), MULTI_TURN | {"id": "m"}])
    eos = tok.eos_token
    ds, _ = prepare(path, tok, 512, template="alpaca", progress=False)
    masked, trained = split_decode(tok, samples_of(ds[0], tok.pad_id)[0])
    assert masked == alpaca_prompt(CHINESE["instruction"], CHINESE["input"])
    assert trained == CHINESE["output"] + eos  # Stanford: the answer follows "### Response:" directly
    masked, _ = split_decode(tok, samples_of(ds[1], tok.pad_id)[0])
    assert masked == alpaca_prompt("What is 2+2?") + alpaca_prompt("And in French, with emoji?")

    ds, _ = prepare(path, tok, 512, template="chat", progress=False)
    t = [c["value"] for c in MULTI_TURN["conversations"]]
    (sample,) = samples_of(ds[1], tok.pad_id)
    masked, trained = split_decode(tok, sample)
    assert trained == f"{t[1]}<|im_end|>{t[3]}<|im_end|>"  # answers + end-of-turn; the "\n" after is masked
    assert masked == (f"<|im_start|>user\n{t[0]}<|im_end|>\n<|im_start|>assistant\n\n<|im_start|>user\n{t[2]}"
                      "<|im_end|>\n<|im_start|>assistant\n\n")
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": v} for i, v in enumerate(t)]
    assert sample["ids"].tolist() == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False))


@pytest.mark.slow
def test_chat_template_with_smollm2(tmp_path, smollm2_gguf, alpaca_demo):
    tok = load_tokenizer(smollm2_gguf)
    records = json.loads(alpaca_demo.read_text(encoding="utf-8"))[:10] + [CHINESE]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    ds, summary = prepare(path, tok, 1024, template="chat", progress=False)
    assert summary.samples == 11 and tok.pad_id == tok.eos_id
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    for i, rec in enumerate(records):
        (sample,) = samples_of(ds[i], tok.pad_id)
        masked, trained = split_decode(tok, sample)
        prompt = alpaca_prompt(rec["instruction"], rec["input"])
        assert masked == f"{system}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n\n"
        assert trained == rec["output"] + "<|im_end|>"
        assert tok.eos_ids == [sample["ids"][sample["labels"] != -100][-1]]  # the trained end-of-turn ends generation


def test_fastchat_with_sentencepiece_matches_mindformers(tmp_path, alpaca_demo):
    """Llama-2's tokenizer is SentencePiece; MindFormers' llama_preprocess masks by token counts."""
    import io

    import sentencepiece as spm

    records = json.loads(alpaca_demo.read_text(encoding="utf-8"))[:40]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([r["instruction"] + " " + r["output"] for r in records]
                                                          + [VICUNA_SYSTEM + " USER: ASSISTANT:"] * 5),
                                   model_writer=model, vocab_size=800, byte_fallback=True, model_type="bpe",
                                   hard_vocab_limit=False, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False,  # as Llama-2's tokenizer.model
                                   minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    tok = load_tokenizer(tmp_path)  # a directory with only tokenizer.model
    assert tok.add_bos and tok.kind == "sentencepiece"
    path = write_jsonl(tmp_path / "a.jsonl", [conv(r) for r in records[:8]] + [MULTI_TURN])
    ds, _ = prepare(path, tok, 4096, template="fastchat", progress=False)
    sp = tok.backend
    sep = " ASSISTANT: "
    for i in range(9):
        messages = load_samples(path)[0][i].messages
        rounds = [(VICUNA_SYSTEM + " " if k == 0 else "") + f"USER: {messages[k]['content']}{sep}"
                  f"{messages[k + 1]['content']}" for k in range(0, len(messages), 2)]
        # llama_preprocess.preprocess: ids = bos + each round's tokens + eos; labels masked by counts.
        ids, labels = [sp.bos_id()], [-100]
        for rou in rounds:
            round_ids = sp.encode(rou) + [sp.eos_id()]
            instruction_len = len(sp.encode(rou.split(sep)[0] + sep)) - 1
            ids += round_ids
            labels += [-100] * instruction_len + round_ids[instruction_len:]
        (sample,) = samples_of(ds[i], tok.pad_id)
        assert sample["ids"].tolist() == ids
        assert sample["labels"].tolist() == labels
        masked, trained = split_decode(tok, sample)
        assert trained.startswith(messages[1]["content"])  # SentencePiece drops the leading '▁' on decode


def test_packed_rows_give_the_same_loss_as_unpacked(tmp_path, tiny_model_dir, alpaca_demo):
    model, tok = load_pretrained(tiny_model_dir)
    records = json.loads(alpaca_demo.read_text(encoding="utf-8"))
    records = sorted(records, key=lambda r: len(r["instruction"]) + len(r["input"]) + len(r["output"]))[:24]
    path = write_jsonl(tmp_path / "a.jsonl", [conv(r) for r in records] + [MULTI_TURN])
    seq = 512
    plain, s1 = prepare(path, tok, seq, template="fastchat", progress=False)
    packed, s2 = prepare(path, tok, seq, template="fastchat", packing=True, progress=False)
    assert s1.samples == s2.samples == 25 and s2.rows < s1.rows == 25 and packed.packing
    assert (s1.tokens, s1.trained_tokens) == (s2.tokens, s2.trained_tokens)
    assert s2.padding_fraction < s1.padding_fraction

    def t(a):
        return torch.from_numpy(np.asarray(a, dtype=np.int64))

    expected = {}
    with torch.no_grad():
        rows = [plain[i] for i in range(len(plain))]
        logits = model(t([r["input_ids"] for r in rows]))  # unpacked: plain causal attention
        for row, row_logits in zip(rows, logits):
            (sample,) = samples_of(row, tok.pad_id)
            loss = F.cross_entropy(row_logits, t(row["targets"]), ignore_index=-100, reduction="sum")
            expected[tuple(sample["ids"].tolist())] = loss.item()
        rows = [packed[i] for i in range(len(packed))]
        logits = model(t([r["input_ids"] for r in rows]), position_ids=t([r["position_ids"] for r in rows]),
                       segment_ids=t([r["segment_ids"] for r in rows]))
        seen = 0
        for row, row_logits in zip(rows, logits):
            for sample in samples_of(row, tok.pad_id):
                span = slice(sample["start"], sample["end"])
                loss = F.cross_entropy(row_logits[span], t(row["targets"][span]), ignore_index=-100, reduction="sum")
                assert loss.item() == pytest.approx(expected[tuple(sample["ids"].tolist())], rel=1e-4, abs=1e-3)
                seen += 1
    assert seen == 25


def test_truncation_and_drop_long_are_counted(tmp_path, tok, alpaca_demo):
    records = json.loads(alpaca_demo.read_text(encoding="utf-8"))[:60]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    full, _ = prepare(path, tok, 8192, progress=False)
    lengths = np.array([len(samples_of(full[i], tok.pad_id)[0]["ids"]) for i in range(len(full))])
    seq = int(np.median(lengths))
    prompt_lengths = np.array([(samples_of(full[i], tok.pad_id)[0]["labels"] != -100).argmax()
                               for i in range(len(full))])
    no_answer = int((prompt_lengths >= seq).sum())  # the prompt alone fills the row
    ds, s = prepare(path, tok, seq, progress=False)
    assert s.truncated == int((lengths > seq).sum()) - no_answer and s.dropped == no_answer
    assert s.samples == len(ds) == 60 - no_answer
    assert s.tokens == int(np.minimum(lengths, seq)[prompt_lengths < seq].sum())
    ds, s = prepare(path, tok, seq, drop_long=True, progress=False)
    assert (s.truncated, s.dropped, s.samples) == (0, int((lengths > seq).sum()), int((lengths <= seq).sum()))
    with pytest.raises(DataError, match="nothing left to train on"):
        prepare(path, tok, 4, progress=False)


def test_alpaca_demo_end_to_end(tmp_path, tok, alpaca_demo, tiny_tokenizer_dir):
    conv = tmp_path / "conv.jsonl"
    assert main(["data", "convert", "--input", str(alpaca_demo), "--output", str(conv)]) == 0
    out = tmp_path / "prepared"
    ds, summary = prepare(conv, tok, 1024, packing=True, output_dir=out, progress=False)
    assert isinstance(ds, PreparedDataset) and len(ds) == summary.rows and ds.packing
    assert summary.records == 999 and summary.samples + summary.dropped == 999
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["tokenizer_fingerprint"] == tok.fingerprint() and meta["template"] == "fastchat"
    assert meta["seq_length"] == 1024 and meta["packing"] is True and meta["pad_id"] == tok.pad_id
    assert meta["counts"]["trained_tokens"] == summary.trained_tokens > 0
    import hashlib
    assert meta["source_sha256"] == hashlib.sha256(conv.read_bytes()).hexdigest()
    # Plain numpy reads it (memory-mapped), without petformers.
    arrays = {c: np.load(out / f"{c}.npy", mmap_mode="r") for c in ("input_ids", "targets", "position_ids",
                                                                    "segment_ids")}
    assert {a.shape for a in arrays.values()} == {(summary.rows, 1024)} and arrays["targets"].dtype == np.int32
    assert ((arrays["targets"] != -100).sum()) == summary.trained_tokens
    assert {k: v.dtype for k, v in ds[3].items()} == {c: np.int32 for c in arrays}
    # The same file prepared straight from Alpaca JSON gives the same rows.
    direct, _ = prepare(alpaca_demo, tok, 1024, packing=True, progress=False)
    assert np.array_equal(direct.arrays["input_ids"], arrays["input_ids"])
    # A dataset made with another tokenizer is refused.
    check_tokenizer(ds.meta, tok, out)
    other = load_tokenizer(write_tiny_tokenizer(tmp_path / "other", vocab_size=400))
    with pytest.raises(DataError, match="another tokenizer"):
        check_tokenizer(ds.meta, other, out)


def test_chinese_round_trip_convert_prepare_decode(tmp_path, tok):
    src = write_jsonl(tmp_path / "zh.jsonl", [CHINESE])
    conv = tmp_path / "conv.jsonl"
    assert main(["data", "convert", "--input", str(src), "--output", str(conv)]) == 0
    ds, _ = prepare(conv, tok, 512, output_dir=tmp_path / "out", progress=False)
    (sample,) = samples_of(ds[0], tok.pad_id)
    masked, trained = split_decode(tok, sample)
    assert trained == " " + CHINESE["output"] + tok.eos_token
    assert alpaca_prompt(CHINESE["instruction"], CHINESE["input"]) in masked


def test_output_dir_is_replaced_atomically_or_refused(tmp_path, tok):
    path = write_jsonl(tmp_path / "zh.jsonl", [CHINESE])
    out = tmp_path / "out"
    prepare(path, tok, 512, output_dir=out, progress=False)
    ds, _ = prepare(path, tok, 384, output_dir=out, progress=False)  # an older dataset is replaced
    assert ds.seq_length == 384 and sorted(p.name for p in tmp_path.iterdir()) == ["out", "zh.jsonl"]
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="refusing to overwrite"):
        prepare(path, tok, 384, output_dir=keep, progress=False)
    assert (keep / "notes.txt").exists()


def test_prepare_text_joins_documents_with_eos(tmp_path, tok):
    docs = ["The first document.", "Le deuxième document, 🎉.", "第三个文件。 " * 20]
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "corpus.jsonl", [{"text": d} for d in docs])
    seq = 32
    a, s = prepare_text(txt, tok, seq, progress=False)
    b, _ = prepare_text(jsonl, tok, seq, progress=False)
    assert np.array_equal(a.arrays["input_ids"], b.arrays["input_ids"]) and a.meta["kind"] == "text"
    stream = [i for d in docs for i in tok.encode(d) + [tok.eos_id]]
    assert s.tokens == len(stream) and s.rows == -(-len(stream) // seq) and s.records == 3
    ids, targets = a.arrays["input_ids"], a.arrays["targets"]
    assert ids.reshape(-1)[:len(stream)].tolist() == stream
    assert (targets[:, :-1][ids[:, 1:] != tok.pad_id] == ids[:, 1:][ids[:, 1:] != tok.pad_id]).all()
    assert (targets[:, -1] == -100).all() and s.trained_tokens == len(stream) - s.rows
    with pytest.raises(DataError, match="raw text"):
        prepare(jsonl, tok, seq, progress=False)


def test_cli_prepare_end_to_end(tmp_path, tiny_tokenizer_dir, capsys):
    src = tmp_path / "mixed.jsonl"
    src.write_text(json.dumps(conv(CHINESE), ensure_ascii=False) + "\n{oops\n" + json.dumps(MULTI_TURN) + "\n",
                   encoding="utf-8")
    out = tmp_path / "ds"
    args = ["data", "prepare", "--input", str(src), "--tokenizer", str(tiny_tokenizer_dir), "--seq_length", "512",
            "--template", "chat", "--packing", "--output_dir", str(out), "--no_progress"]
    assert main(args) == 2
    assert f"{src}:2: not JSON" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--skip_invalid"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "records 3  samples 2  rows 1" in captured.err and f"skipped {src}:2: not JSON" in captured.err
    ds = PreparedDataset(out)
    assert ds.meta["template"] == "chat" and ds.meta["skipped"] == [f"{src}:2: not JSON (Expecting property "
                                                                     "name enclosed in double quotes at column 2)"]
    txt = tmp_path / "c.txt"
    txt.write_text("Some raw text.\n\nMore text.", encoding="utf-8")
    assert main(["data", "prepare", "--input", str(txt), "--tokenizer", str(tiny_tokenizer_dir), "--seq_length",
                 "16", "--output_dir", str(tmp_path / "t"), "--no_progress"]) == 0
    assert PreparedDataset(tmp_path / "t").meta["kind"] == "text"
