"""Reading Alpaca / ShareGPT / OpenAI-messages files, `convert`, and the errors bad input gets."""

from __future__ import annotations

import json

import pytest

from petformers.data.formats import PROMPT_INPUT, PROMPT_NO_INPUT, alpaca_prompt, convert, load_samples
from petformers.errors import DataError

# BRIEF §1.4 / MindFormers' alpaca_converter.py / Stanford Alpaca's train.py, verbatim.
STANFORD_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                  "{instruction}\n\n### Input:\n{input}\n\n### Response:")
STANFORD_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                     "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")

UNICODE = {"instruction": "把这句话翻译成英文。", "input": "你好，世界！🎉 مرحبا بالعالم \u2028 end",
           "output": "Hello, world! 🎉 — «ok» עברית"}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_alpaca_prompt_is_stanford_wording():
    assert PROMPT_INPUT == STANFORD_INPUT and PROMPT_NO_INPUT == STANFORD_NO_INPUT
    assert alpaca_prompt("Do X.", "") == STANFORD_NO_INPUT.format(instruction="Do X.")
    assert alpaca_prompt("Do X.", "on Y") == STANFORD_INPUT.format(instruction="Do X.", input="on Y")


def test_convert_alpaca_demo(alpaca_demo, tmp_path):
    out = tmp_path / "conv.jsonl"
    written, skipped, fmt = convert(alpaca_demo, out)
    source = json.loads(alpaca_demo.read_text(encoding="utf-8"))
    lines = out.read_text(encoding="utf-8").splitlines()
    assert (written, skipped, fmt, len(lines)) == (999, [], "alpaca", 999)
    for i in (0, 1, 500, 998):
        rec, conv = source[i], json.loads(lines[i])
        prompt = (STANFORD_INPUT if rec["input"] else STANFORD_NO_INPUT).format(**rec)
        assert conv == {"id": str(i + 1), "conversations": [{"from": "human", "value": prompt},
                                                            {"from": "gpt", "value": rec["output"]}]}
    # The converted file reads back as the same conversations.
    again, _, _, fmt2, _ = load_samples(out)
    first, _, _, _, _ = load_samples(alpaca_demo)
    assert fmt2 == "sharegpt" and [s.messages for s in again] == [s.messages for s in first]


def test_unicode_round_trips_through_convert(tmp_path):
    src = write_jsonl(tmp_path / "zh.jsonl", [UNICODE])
    out = tmp_path / "conv.jsonl"
    convert(src, out)
    text = out.read_text(encoding="utf-8")
    assert "把这句话翻译成英文。" in text and "🎉" in text and "\\u" not in text  # written as is
    conv = json.loads(text.split("\n")[0])
    assert conv["conversations"][0]["value"] == alpaca_prompt(UNICODE["instruction"], UNICODE["input"])
    assert conv["conversations"][1]["value"] == UNICODE["output"]
    again, _, _, _, _ = load_samples(out)  # U+2028 inside a string does not split the line
    assert again[0].messages[1]["content"] == UNICODE["output"]


def test_formats_are_told_apart(tmp_path):
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Ciao"}]
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"},
                                  {"from": "gpt", "value": "Ciao"}]}
    messages = {"messages": expected}
    for name, rec in (("share.jsonl", sharegpt), ("msgs.jsonl", messages)):
        samples, _, n, fmt, sha = load_samples(write_jsonl(tmp_path / name, [rec, rec]))
        assert n == 2 and fmt in ("sharegpt", "messages") and len(sha) == 64
        assert samples[1].messages == expected
    # MindFormers' converter writes a JSON array of conversations (indented): read too.
    (tmp_path / "conv.json").write_text(json.dumps([sharegpt], indent=2), encoding="utf-8")
    samples, _, _, fmt, _ = load_samples(tmp_path / "conv.json")
    assert fmt == "sharegpt" and samples[0].messages == expected
    # Alpaca with system and history (LLaMA-Factory's fields).
    alpaca = {"instruction": "Bye", "input": "", "output": "Ciao", "system": "Be brief.", "history": [["Hi", "Hello"]]}
    samples, _, _, fmt, _ = load_samples(write_jsonl(tmp_path / "a.jsonl", [alpaca]))
    assert fmt == "alpaca"
    assert samples[0].messages[:3] == expected[:3]
    assert samples[0].messages[3] == {"role": "user", "content": alpaca_prompt("Bye")}


BAD = [
    # (file content, expected message parts)
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', ["bad.jsonl:2:", "not JSON"]),
    ('{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n', ["bad.jsonl:3:", "output: missing"]),
    ('{"instruction": 5, "output": "b"}\n', ["bad.jsonl:1:", "instruction: expected a string, got a number"]),
    ('{"instruction": "a", "input": null, "output": "b"}\n', ["bad.jsonl:1:", "input: expected a string, got null"]),
    ('{"instruction": "a", "output": "  "}\n', ["bad.jsonl:1:", "output: empty answer"]),
    ("", ["bad.jsonl", "the file is empty"]),
    ("\n  \n", ["bad.jsonl", "the file is empty"]),
    ('{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}\n',
     ["bad.jsonl:1:", "conversations[1].value: empty answer"]),
    ('{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ["x"]}]}\n',
     ["bad.jsonl:1:", "conversations[1].value: expected a string, got a list"]),
    ('{"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}\n',
     ["bad.jsonl:1:", "conversations[1].from: unknown speaker 'robot'"]),
    ('{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}\n',
     ["bad.jsonl:1:", "conversations[0]: expected a user turn"]),
    ('{"conversations": [{"from": "human", "value": "q"}]}\n', ["bad.jsonl:1:", "ends with a user turn"]),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}\n',
     ["bad.jsonl:1:", "messages[1].content: missing"]),
    ('[1, 2]\n', ["bad.jsonl:1:", "expected a JSON object"]),
    ('{"foo": 1}\n', ["bad.jsonl:1:", "cannot tell the format"]),
    ('{"foo": 1}\n{"instruction": "a", "output": "b"}\n', ["bad.jsonl:1:", "instruction: missing"]),
]


@pytest.mark.parametrize("content,parts", BAD)
def test_bad_input_names_file_line_and_key(tmp_path, content, parts):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_samples(path)
    for part in parts:
        assert part in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_record_in_json_array_names_line_and_index(tmp_path):
    records = [{"instruction": "a", "input": "", "output": "b"}] * 3
    records[2] = {"instruction": "a", "input": ""}
    path = tmp_path / "arr.json"
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=r"arr.json:12: record 2: output: missing"):
        load_samples(path)
    path.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"arr.json:2: not valid JSON"):
        load_samples(path)
    (tmp_path / "x.bin").write_bytes(b'{"instruction": "a", "output": "\xff"}\n')
    with pytest.raises(DataError, match=r"x.bin:1: not UTF-8"):
        load_samples(tmp_path / "x.bin")


def test_skip_invalid_keeps_every_good_record(tmp_path, alpaca_demo):
    good = json.loads(alpaca_demo.read_text(encoding="utf-8"))[:40] + [UNICODE]
    lines = [json.dumps(r, ensure_ascii=False) for r in good]
    bad = {3: "{not json", 10: '{"instruction": "x"}', 20: '{"instruction": "x", "output": ""}',
           30: '{"instruction": 1, "output": "y"}', 35: "[]"}
    for at in sorted(bad):  # insert bad lines at these (1-based) line numbers
        lines.insert(at - 1, bad[at])
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="mixed.jsonl:3: not JSON"):
        load_samples(path)
    samples, skipped, n, _, _ = load_samples(path, skip_invalid=True)
    assert n == len(good) + len(bad)
    expected, _, _, _, _ = load_samples(write_jsonl(tmp_path / "good.jsonl", good))
    assert [s.messages for s in samples] == [s.messages for s in expected]
    assert [s.split(": ")[0] for s in skipped] == [f"{path}:{at}" for at in sorted(bad)]
    assert "output: empty answer" in skipped[2] and "instruction: expected a string" in skipped[3]
    out = tmp_path / "conv.jsonl"
    written, skipped2, _ = convert(path, out, skip_invalid=True)
    assert written == len(good) and skipped2 == skipped
