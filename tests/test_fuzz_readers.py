"""Hostile and broken inputs, generated (hypothesis, 200 cases per reader, derandomized so a failure
reproduces): every reader either reads the file or raises a PetformersError -- which the CLI prints as
one line with exit code 2 -- whose message is one line naming the file and where in it: a line, record,
row, byte, key or tensor (or, for a file that is wrong as a whole, saying so). Any other exception (a raw
KeyError, a UnicodeDecodeError, a struct.error...) fails the test: it would be a traceback for a user.
With --skip_invalid no good record is lost. Chat templates cannot reach Python internals or run for ever.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import MINDSPORE_FIXTURES
from petformers.errors import PetformersError

CASES = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                        HealthCheck.data_too_large])
FIXTURES = MINDSPORE_FIXTURES


# Where in a file: "file:LINE:", a line, record, row, byte or column number, the header, a named tensor or key.
LOCATION = re.compile(r":\d+[:,] |\b(line|record|row|byte|column) \d+|\bheader\b|\btensor '|\bkey '|\btop level\b")
WHOLE_FILE = ("the file is empty", "the JSON array is empty", "empty file")  # nothing finer to point at


def located(message: str, keys=()) -> bool:
    return bool(LOCATION.search(message)) or any(k in message for k in keys) or any(w in message for w in WHOLE_FILE)


def read_or_refuse(fn, names, keys=()):
    """fn() succeeds, or raises a PetformersError of one line that names one of `names` and where in it
    (LOCATION, one of `keys`, or a whole-file condition)."""
    try:
        fn()
    except PetformersError as e:
        event("refused in one line")
        message = str(e)
        assert "\n" not in message, message
        assert any(str(n) in message for n in names), (message, names)
        assert located(message, keys), f"no line/record/key in: {message}"
    else:
        event("read")


# ---- data files: Alpaca, ShareGPT, messages, text; JSON and JSONL --------------------------------------------

KEYS = ["instruction", "input", "output", "system", "history", "conversations", "from", "value", "messages",
        "role", "content", "text", "id"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=30), st.sampled_from(["human", "gpt", "user", "assistant", "system", ""]),
                    st.just("x" * 100_000))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
                      max_leaves=12)
records = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)


def _write_data(tmp: Path, items, jsonl: bool, bom: bool, garbage: bytes | None, suffix: str) -> Path:
    if jsonl:
        text = "\n".join(json.dumps(r, ensure_ascii=False) for r in items)
    else:
        text = json.dumps(items, ensure_ascii=False)
    data = text.encode("utf-8", "surrogatepass")
    if bom:
        data = b"\xef\xbb\xbf" + data
    if garbage is not None:
        cut = len(data) // 2
        data = data[:cut] + garbage + data[cut:]
    path = tmp / f"data{suffix}"
    path.write_bytes(data)
    return path


@CASES
@given(items=st.lists(st.one_of(records, values), max_size=5), jsonl=st.booleans(), bom=st.booleans(),
       garbage=st.one_of(st.none(), st.sampled_from([b"\xff\xfe", b"\xc3", b"\x00", b"}{", b"\n\n"])),
       skip=st.booleans())
def test_fuzz_conversation_files(tmp_path_factory, items, jsonl, bom, garbage, skip):
    from petformers.data.formats import load_samples

    path = _write_data(tmp_path_factory.mktemp("d"), items, jsonl, bom, garbage, ".jsonl" if jsonl else ".json")
    read_or_refuse(lambda: load_samples(path, skip_invalid=skip), [path], [f"'{k}'" for k in KEYS])


@CASES
@given(items=st.lists(st.one_of(records, values), max_size=5), jsonl=st.booleans(), bom=st.booleans(),
       garbage=st.one_of(st.none(), st.sampled_from([b"\xff\xfe", b"\xc3", b"\x00"])), txt=st.booleans())
def test_fuzz_text_files(tmp_path_factory, items, jsonl, bom, garbage, txt):
    from petformers.data.formats import load_texts

    tmp = tmp_path_factory.mktemp("t")
    if txt:
        path = tmp / "corpus.txt"
        body = "\n\n".join(str(v) for v in items).encode("utf-8", "surrogatepass")
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body + (garbage or b""))
    else:
        path = _write_data(tmp, items, jsonl, bom, garbage, ".jsonl" if jsonl else ".json")
    read_or_refuse(lambda: load_texts(path, skip_invalid=True), [path], [f"'{k}'" for k in KEYS])


good_alpaca = st.builds(lambda i, o, x: {"instruction": i, "input": x, "output": o},
                        st.text(min_size=1, max_size=20).filter(str.strip),
                        st.text(min_size=1, max_size=20).filter(str.strip), st.text(max_size=10))
bad_alpaca = st.one_of(
    st.builds(lambda r, k, v: {**r, k: v}, good_alpaca, st.sampled_from(["instruction", "output", "input"]),
              st.one_of(st.none(), st.integers(), st.lists(st.integers(), max_size=2), st.just({}))),
    st.builds(lambda r, v: {**r, "output": v}, good_alpaca, st.sampled_from(["", "  ", "\n"])),  # no answer
    st.builds(lambda r: {k: v for k, v in r.items() if k != "output"}, good_alpaca),
    st.just("not a record"), st.just(None), st.just(7))


@CASES
@given(rows=st.lists(st.tuples(st.booleans(), good_alpaca, bad_alpaca), min_size=1, max_size=12),
       jsonl=st.booleans())
def test_fuzz_skip_invalid_keeps_every_good_record(tmp_path_factory, rows, jsonl):
    from petformers.data.formats import load_samples

    items = [good if keep else bad for keep, good, bad in rows]
    good = [r for keep, r, _ in rows if keep]
    path = _write_data(tmp_path_factory.mktemp("s"), items, jsonl, False, None, ".jsonl" if jsonl else ".json")
    if not good:
        read_or_refuse(lambda: load_samples(path, skip_invalid=True), [path])
        return
    samples, skipped, count, fmt, _ = load_samples(path, skip_invalid=True)
    assert len(samples) == len(good) and len(skipped) == len(items) - len(good)
    for sample, record in zip(samples, good):
        assert record["output"] in [m["content"] for m in sample.messages]
    for message in skipped:
        assert "\n" not in message and str(path) in message and located(message), message


# ---- YAML run configs ----------------------------------------------------------------------------------------

CONFIG_KEYS = ["seed", "run_mode", "output_dir", "load_checkpoint", "runner_config", "epochs", "batch_size",
               "optimizer", "type", "learning_rate", "model", "model_config", "seq_length", "compute_dtype",
               "pet_config", "pet_type", "lora_rank", "lora_alpha", "target_modules", "train_dataset",
               "data_loader", "dataset_dir", "parallel_config", "data_parallel", "use_parallel", "lr_schedule",
               "callbacks", "template", "max_steps", "unknown_key", "do_eval"]
yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10, 10**12), st.floats(allow_nan=True), st.text(max_size=12),
              st.sampled_from(["finetune", "train", "eval", "lora", "float32", "bfloat16", "fsdp", "-1", "1e-3"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(CONFIG_KEYS), inner,
                                                                         max_size=4)),
    max_leaves=10)


@CASES
@given(doc=st.dictionaries(st.sampled_from(CONFIG_KEYS), yaml_values, max_size=6),
       mangle=st.sampled_from(["", "tab", "duplicate", "truncate", "bad_utf8", "anchor"]))
def test_fuzz_yaml_configs(tmp_path_factory, doc, mangle, capsys):
    import yaml

    from petformers.cli.main import main

    tmp = tmp_path_factory.mktemp("y")
    text = yaml.safe_dump(doc, allow_unicode=True)
    if mangle == "tab":
        text = text.replace("  ", "\t", 1) or "\tseed: 1\n"
    elif mangle == "duplicate":
        text = text + text.split("\n", 1)[0] + "\n" if text.strip() not in ("{}", "") else "seed: 1\nseed: 2\n"
    elif mangle == "truncate":
        text = text[: len(text) // 2] + ": [\n"
    elif mangle == "anchor":
        text = "a: &x [*x]\n" + text
    path = tmp / "run.yaml"
    path.write_bytes(text.encode("utf-8") + (b"\xff" if mangle == "bad_utf8" else b""))
    code = main(["run", "--config", str(path), "--dry_run", "--output_dir", str(tmp / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (0, 2), code
    if code == 2:
        assert err[-1].startswith("petformers: error: ") and "Traceback" not in "\n".join(err), err[-3:]
        assert str(path) in err[-1] and located(err[-1], CONFIG_KEYS), err[-1]


# ---- weights: safetensors (+ index), GGUF headers, MindSpore .ckpt, MindRecord ----------------------------------

def mutations(size: int, head: int = 4096):
    """Byte overwrites (mostly in the header) and an optional truncation."""
    return st.tuples(st.lists(st.tuples(st.integers(0, min(size, head) - 1), st.integers(0, 255)), max_size=6),
                     st.one_of(st.none(), st.integers(0, size)))


def mutate(data: bytes, change) -> bytes:
    edits, cut = change
    buf = bytearray(data)
    for pos, byte in edits:
        buf[pos] = byte
    return bytes(buf[:cut] if cut is not None else buf)


@pytest.fixture(scope="module")
def model_bytes(tiny_model_dir) -> bytes:
    return (tiny_model_dir / "model.safetensors").read_bytes()


@CASES
@given(data=st.data())
def test_fuzz_safetensors(tmp_path_factory, tiny_model_dir, model_bytes, data):
    from petformers.checkpoint import hf

    tmp = tmp_path_factory.mktemp("st")
    shutil.copy(tiny_model_dir / "config.json", tmp / "config.json")
    (tmp / "model.safetensors").write_bytes(mutate(model_bytes, data.draw(mutations(len(model_bytes), 512))))
    read_or_refuse(lambda: list(hf.iter_tensors(tmp)), [tmp / "model.safetensors"])


index_names = st.one_of(st.just("model.safetensors"), st.just("../model.safetensors"), st.just("/etc/passwd"),
                        st.just("sub/../../x"), st.just(""), st.just("a\x00b"), st.text(max_size=20),
                        st.integers(), st.none())


@CASES
@given(doc=st.one_of(st.dictionaries(st.sampled_from(["weight_map", "metadata"]),
                                     st.one_of(st.dictionaries(st.text(max_size=10), index_names, max_size=4),
                                               index_names, st.lists(index_names, max_size=2)), max_size=2),
                     yaml_values),
       raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_fuzz_safetensors_index_stays_inside_its_directory(tmp_path_factory, tiny_model_dir, doc, raw):
    from petformers.checkpoint import hf

    tmp = tmp_path_factory.mktemp("ix")
    model = tmp / "model"
    model.mkdir()
    shutil.copy(tiny_model_dir / "model.safetensors", model / "model.safetensors")
    index = model / "model.safetensors.index.json"
    index.write_bytes(raw if raw is not None else json.dumps(doc).encode())
    try:
        files = hf.weight_files(model)
    except PetformersError as e:
        assert "\n" not in str(e) and str(index) in str(e), str(e)
        assert located(str(e), ["weight_map"]), str(e)
        return
    root = model.resolve()
    assert all(f.resolve().is_relative_to(root) for f in files), files


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    import gguf
    import numpy as np

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c", "d"])
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@CASES
@given(data=st.data())
def test_fuzz_gguf_headers(tmp_path_factory, gguf_bytes, data):
    from petformers.checkpoint import gguf_file

    path = tmp_path_factory.mktemp("g") / "model.gguf"
    path.write_bytes(mutate(gguf_bytes, data.draw(mutations(len(gguf_bytes), 1024))))

    def read():
        reader = gguf_file.open_reader(path)
        metadata = gguf_file.read_metadata(reader)
        gguf_file.read_config(reader, metadata, str(path))

    read_or_refuse(read, [path])


@pytest.mark.skipif(not FIXTURES.exists(), reason=f"MindSpore fixtures not present at {FIXTURES}")
@CASES
@given(data=st.data())
def test_fuzz_mindspore_ckpt(tmp_path_factory, data):
    from petformers.checkpoint.mindspore_ckpt import read_ckpt

    original = (FIXTURES / "tiny_llama_lora.ckpt").read_bytes()
    path = tmp_path_factory.mktemp("ms") / "model.ckpt"
    path.write_bytes(mutate(original, data.draw(mutations(len(original), 2048))))
    read_or_refuse(lambda: read_ckpt(path), [path])


@pytest.mark.skipif(not FIXTURES.exists(), reason=f"MindSpore fixtures not present at {FIXTURES}")
@CASES
@given(data=st.data(), which=st.sampled_from(["record", "db"]))
def test_fuzz_mindrecord(tmp_path_factory, data, which):
    from petformers.data.mindrecord import read_mindrecord

    tmp = tmp_path_factory.mktemp("mr")
    shutil.copy(FIXTURES / "alpaca_tiny.mindrecord", tmp / "alpaca_tiny.mindrecord")
    shutil.copy(FIXTURES / "alpaca_tiny.mindrecord.db", tmp / "alpaca_tiny.mindrecord.db")
    target = tmp / ("alpaca_tiny.mindrecord" + (".db" if which == "db" else ""))
    original = target.read_bytes()
    target.write_bytes(mutate(original, data.draw(mutations(len(original), 4096))))
    # A damaged SQLite page index has no finer place to point at than the .db file itself.
    read_or_refuse(lambda: read_mindrecord(tmp / "alpaca_tiny.mindrecord"), [target],
                   ["MindRecord index"] if which == "db" else [])


# ---- adapter_config.json, tokenizer.json, chat templates -----------------------------------------------------

ADAPTER_KEYS = ["peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "bias",
                "fan_in_fan_out", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                "task_type", "base_model_name_or_path", "init_lora_weights"]


@CASES
@given(doc=st.one_of(st.dictionaries(st.sampled_from(ADAPTER_KEYS), yaml_values, max_size=8), yaml_values),
       raw=st.one_of(st.none(), st.binary(max_size=30)))
def test_fuzz_adapter_config(tmp_path_factory, doc, raw):
    from petformers.checkpoint.peft import read_adapter_config

    tmp = tmp_path_factory.mktemp("ad")
    (tmp / "adapter_config.json").write_bytes(raw if raw is not None else json.dumps(doc).encode())
    read_or_refuse(lambda: read_adapter_config(tmp), [tmp / "adapter_config.json"], ADAPTER_KEYS)


@pytest.fixture(scope="module")
def tokenizer_json(tiny_tokenizer_dir) -> dict:
    return json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))


@CASES
@given(data=st.data())
def test_fuzz_tokenizer_json(tmp_path_factory, tiny_tokenizer_dir, tokenizer_json, data):
    from petformers.tokenizer import Tokenizer

    tmp = tmp_path_factory.mktemp("tk")
    doc = json.loads(json.dumps(tokenizer_json))
    section = data.draw(st.sampled_from(["model", "added_tokens", "pre_tokenizer", "decoder", "normalizer",
                                         "post_processor", "raw"]))
    if section == "raw":
        text = json.dumps(doc).encode()
        (tmp / "tokenizer.json").write_bytes(mutate(text, data.draw(mutations(len(text), len(text)))))
    else:
        doc[section] = data.draw(yaml_values)
        (tmp / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    shutil.copy(tiny_tokenizer_dir / "tokenizer_config.json", tmp / "tokenizer_config.json")
    read_or_refuse(lambda: Tokenizer.from_dir(tmp).encode("hello world"), [tmp / "tokenizer.json"])


HOSTILE_TEMPLATES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ raise_exception.__globals__ }}",
    "{% set x = messages.append(1) %}{{ x }}",
    "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ (messages[0]['content'] * 100000) * 100000 }}",
    "{{ self.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
]


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_hostile_chat_templates_are_stopped(template, monkeypatch):
    from petformers.tokenizer import render_chat_template

    monkeypatch.setenv("PETFORMERS_TEMPLATE_TIMEOUT", "2")
    started = time.monotonic()
    messages = [{"role": "user", "content": "hi"}]
    try:
        out = render_chat_template(template, messages, True)
    except PetformersError as e:
        assert "\n" not in str(e) and "chat template" in str(e), str(e)
    else:
        assert "uid=" not in out and "<class" not in out and "function" not in out, out[:200]
    assert time.monotonic() - started < 10
    assert messages == [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def template_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    tmp = tmp_path_factory.mktemp("tpl")
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", tmp / "tokenizer.json")
    return tmp


@CASES
@given(template=st.lists(st.sampled_from(list("{}%#-+*/()[]'\". _|~abcdefmnorstxz0123456789")
                                        + ["{{", "}}", "{%", "%}", " for ", " in ", " if ", " endfor ", " endif ",
                                           "messages", "range(", "__class__", "loop.", "raise_exception(",
                                           "|tojson", "set ", "*", "**", "99999"]), min_size=1,
                         max_size=40).map("".join))
def test_fuzz_chat_templates(template_dir, template):
    from petformers.tokenizer import Tokenizer

    config = template_dir / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": template}), encoding="utf-8")
    try:
        Tokenizer.from_dir(template_dir).apply_chat_template([{"role": "user", "content": "hi"}], True)
    except PetformersError as e:
        event("refused in one line")
        assert "\n" not in str(e) and f"{config}: chat_template" in str(e), str(e)
        assert re.search(r"\bline \d+", str(e)) or "stopped" in str(e) or "recursion" in str(e), str(e)
