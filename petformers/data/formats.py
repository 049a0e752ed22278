"""Reading the instruction data users hold, and turning every record into one conversation.

Accepted files (the format is told apart per file, from its first JSON object):
- Alpaca: `{"instruction", "input"?, "output", "system"?, "history"?}`, as a JSON array or JSONL;
- ShareGPT / MindFormers conversation: `{"conversations": [{"from": "human"|"gpt"|"system", "value"}]}`;
- OpenAI chat: `{"messages": [{"role": "system"|"user"|"assistant", "content"}]}`;
- raw text (pre-training, `run_mode train`): a `.txt` file, or JSONL with a `text` field.

Inside petformers a conversation is a list of OpenAI-style messages (`role`, `content`): an
optional system message, then user / assistant turns alternating, ending with an assistant turn.

An Alpaca record becomes a two-turn conversation whose user turn is Stanford Alpaca's prompt,
worded exactly as MindFormers' `alpaca_converter.py` (and Stanford's `train.py`) word it.
`history` pairs (LLaMA-Factory's extension) become earlier turns, as given.

Errors name the file, the line, and the key (a JSON path inside the record):
`conv.jsonl:12: conversations[1].value: empty answer`. For a JSON array the record index is
given too: `alpaca.json:4031: record 57: output: expected a string, got null`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

from petformers.atomic import atomic_open
from petformers.errors import DataError

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

# ShareGPT speaker names -> chat roles. ShareGPT dumps use several names for the model.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system"}
ROLE_TO_SHAREGPT = {"user": "human", "assistant": "gpt", "system": "system"}


class RecordError(Exception):
    """A record is invalid: `key` is the JSON path inside the record, `reason` what is wrong."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key, self.reason = key, reason


@dataclass
class Record:
    """One JSON value read from a file, and where it is (for error messages)."""

    where: str  # "file:line" or "file:line: record N"
    value: object = None
    error: str | None = None  # set when the line is not JSON


@dataclass
class Sample:
    """One conversation (OpenAI-style messages) and where it came from."""

    where: str
    messages: list[dict]
    id: str | None = None  # the record's own "id", kept by `convert`


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """Stanford Alpaca's prompt (with or without the Input block), as alpaca_converter writes it."""
    if input_text != "":
        return PROMPT_INPUT.format_map({"instruction": instruction, "input": input_text})
    return PROMPT_NO_INPUT.format_map({"instruction": instruction})


# ---- reading files ----------------------------------------------------------------------------
def read_text(path: Path) -> tuple[str, str]:
    """(text, sha256 of the bytes). UTF-8, with or without a byte-order mark."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory; pass a .json, .jsonl or .txt file") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None
    return text, hashlib.sha256(raw).hexdigest()


def read_records(path: Path, text: str) -> list[Record]:
    """JSON values of a JSON-array file or a JSONL file (one value per line; blank lines ignored).

    A line that is not JSON becomes a Record with `error` set, so that --skip_invalid can skip it.
    A JSON array that does not parse is an error: there is no next record to resume at.
    """
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    stripped = text.lstrip()
    if stripped.startswith("["):
        return _read_json_array(path, text)
    records = []
    # split("\n"), not splitlines(): U+2028 and friends may appear raw inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            records.append(Record(where, json.loads(line)))
        except json.JSONDecodeError as e:
            records.append(Record(where, error=f"not JSON ({e.msg} at column {e.colno})"))
    return records


def _read_json_array(path: Path, text: str) -> list[Record]:
    decoder = json.JSONDecoder()
    records, pos, line, counted = [], text.index("[") + 1, 1, 0
    n = len(text)

    def skip_space(p):
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    try:
        pos = skip_space(pos)
        if pos < n and text[pos] == "]":
            pos += 1
        else:
            while True:
                pos = skip_space(pos)
                line += text.count("\n", counted, pos)
                counted = pos
                value, pos = decoder.raw_decode(text, pos)
                records.append(Record(f"{path}:{line}: record {len(records)}", value))
                pos = skip_space(pos)
                if pos < n and text[pos] == ",":
                    pos += 1
                    continue
                if pos < n and text[pos] == "]":
                    pos += 1
                    break
                raise json.JSONDecodeError("expected ',' or ']'", text, pos)
        if skip_space(pos) != n:
            raise json.JSONDecodeError("extra data after the array", text, skip_space(pos))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not records:
        raise DataError(f"{path}: the JSON array is empty")
    return records


def detect_record_format(path: Path, records: list[Record]) -> str:
    """'alpaca', 'sharegpt', 'messages' or 'text': the format of the first record that shows one.

    Records before it (not JSON, or objects of no known format) are reported as bad records later.
    """
    for rec in records:
        if isinstance(rec.value, dict):
            keys = rec.value
            if "conversations" in keys:
                return "sharegpt"
            if "messages" in keys:
                return "messages"
            if "instruction" in keys or "output" in keys:
                return "alpaca"
            if "text" in keys:
                return "text"
    first = next((r for r in records if isinstance(r.value, dict)), None)
    if first is not None:
        raise DataError(f"{first.where}: cannot tell the format from keys {sorted(first.value)[:8]}: expected "
                        "'instruction'/'output' (Alpaca), 'conversations' (ShareGPT), 'messages' "
                        "(OpenAI chat) or 'text' (raw text)")
    first = records[0]
    raise DataError(f"{first.where}: {first.error or 'expected a JSON object'}")


# ---- records -> conversations -------------------------------------------------------------------
def _string(obj: dict, key: str, path: str, required: bool = True, default: str = "") -> str:
    if key not in obj:
        if required:
            raise RecordError(path, "missing")
        return default
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(path, f"expected a string, got {_type_name(value)}")
    return value


def _type_name(value) -> str:
    return "null" if value is None else {dict: "an object", list: "a list", bool: "a boolean",
                                         int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def alpaca_messages(rec: dict) -> list[dict]:
    instruction = _string(rec, "instruction", "instruction")
    input_text = _string(rec, "input", "input", required=False)
    output = _string(rec, "output", "output")
    system = _string(rec, "system", "system", required=False)
    messages = [{"role": "system", "content": system}] if system else []
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise RecordError("history", f"expected a list of [instruction, answer] pairs, got {_type_name(history)}")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise RecordError(f"history[{i}]", "expected an [instruction, answer] pair")
        for j, text in enumerate(pair):
            if not isinstance(text, str):
                raise RecordError(f"history[{i}][{j}]", f"expected a string, got {_type_name(text)}")
        if not pair[1].strip():
            raise RecordError(f"history[{i}][1]", "empty answer")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    if not output.strip():
        raise RecordError("output", "empty answer")
    return messages + [{"role": "user", "content": alpaca_prompt(instruction, input_text)},
                       {"role": "assistant", "content": output}]


def sharegpt_messages(rec: dict) -> list[dict]:
    turns = rec.get("conversations")
    if not isinstance(turns, list):
        raise RecordError("conversations", "missing" if turns is None else
                          f"expected a list, got {_type_name(turns)}")
    messages = []
    if "system" in rec:  # some ShareGPT dumps keep the system prompt beside the turns
        messages.append({"role": "system", "content": _string(rec, "system", "system")})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"conversations[{i}]", f"expected an object, got {_type_name(turn)}")
        speaker = _string(turn, "from", f"conversations[{i}].from")
        if speaker.lower() not in SHAREGPT_ROLES:
            raise RecordError(f"conversations[{i}].from", f"unknown speaker {speaker!r} "
                              "(expected human, gpt or system)")
        messages.append({"role": SHAREGPT_ROLES[speaker.lower()],
                         "content": _string(turn, "value", f"conversations[{i}].value")})
    return check_conversation(messages, "conversations", "value", offset=1 if "system" in rec else 0)


def openai_messages(rec: dict) -> list[dict]:
    turns = rec.get("messages")
    if not isinstance(turns, list):
        raise RecordError("messages", "missing" if turns is None else f"expected a list, got {_type_name(turns)}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"messages[{i}]", f"expected an object, got {_type_name(turn)}")
        role = _string(turn, "role", f"messages[{i}].role")
        if role not in ("system", "user", "assistant"):
            raise RecordError(f"messages[{i}].role", f"unsupported role {role!r} (expected system, user "
                              "or assistant)")
        messages.append({"role": role, "content": _string(turn, "content", f"messages[{i}].content")})
    return check_conversation(messages, "messages", "content")


def check_conversation(messages: list[dict], key: str, field: str, offset: int = 0) -> list[dict]:
    """An optional system message, then user/assistant alternating, ending with a non-empty answer.

    `offset` shifts the indices in error messages when the first message did not come from `key`.
    """
    start = 1 if messages and messages[0]["role"] == "system" else 0
    if len(messages) - start == 0:
        raise RecordError(key, "no turns")
    for i in range(start, len(messages)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if messages[i]["role"] != expected:
            raise RecordError(f"{key}[{i - offset}]", f"expected a {expected} turn here, got "
                              f"{messages[i]['role']} (turns must alternate user, assistant, ...)")
        if expected == "assistant" and not messages[i]["content"].strip():
            raise RecordError(f"{key}[{i - offset}].{field}", "empty answer")
    if messages[-1]["role"] != "assistant":
        raise RecordError(f"{key}[{len(messages) - 1 - offset}]", "the conversation ends with a user turn "
                          "(no answer to train on)")
    return messages


def to_messages(value, fmt: str) -> list[dict]:
    if not isinstance(value, dict):
        raise RecordError("", f"expected a JSON object, got {_type_name(value)}")
    if fmt == "alpaca":
        return alpaca_messages(value)
    if fmt == "sharegpt":
        return sharegpt_messages(value)
    return openai_messages(value)


class LoadedSamples(NamedTuple):
    """What load_samples read (a named tuple: `samples, skipped, *_ = load_samples(p)` still works)."""
    samples: list[Sample]
    skipped: list[str]  # one message per record skipped with skip_invalid
    records: int  # records in the file
    format: str  # alpaca | sharegpt | messages
    sha256: str  # of the source file


def load_samples(path, skip_invalid: bool = False) -> LoadedSamples:
    """(samples, skipped messages, number of records, format, source sha256) of a conversation file.

    Without `skip_invalid` the first bad record raises DataError; with it, bad records are
    skipped and listed, and every good record is kept.
    """
    path = Path(path)
    text, sha = read_text(path)
    records = read_records(path, text)
    fmt = detect_record_format(path, records)
    if fmt == "text":
        raise DataError(f"{path}: records have a 'text' field: this is raw text for pre-training "
                        "(run_mode train), not instruction data")
    samples, skipped = [], []
    for rec in records:
        try:
            if rec.error:
                raise RecordError("", rec.error)
            record_id = rec.value.get("id") if isinstance(rec.value, dict) else None
            record_id = str(record_id) if isinstance(record_id, (str, int)) else None
            samples.append(Sample(rec.where, to_messages(rec.value, fmt), record_id))
        except RecordError as e:
            message = f"{rec.where}: {e}"
            if not skip_invalid:
                raise DataError(message + " (--skip_invalid skips bad records)") from None
            skipped.append(message)
    if not samples:
        raise DataError(f"{path}: no valid record ({len(skipped)} skipped; the first: {skipped[0]})")
    return LoadedSamples(samples, skipped, len(records), fmt, sha)


def load_texts(path, skip_invalid: bool = False) -> tuple[list[str], list[str], str]:
    """(documents, skipped messages, source sha256) of raw text for pre-training.

    A `.txt` file is split into documents at blank lines (paragraphs, as MindFormers' wikitext
    preprocessing does); JSONL / JSON records give one document per `text` field.
    """
    path = Path(path)
    text, sha = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    if path.suffix.lower() == ".txt":
        docs = [d.strip("\r\n") for d in re.split(r"\r?\n(?:[ \t]*\r?\n)+", text)]
        return [d for d in docs if d.strip()], [], sha
    records = read_records(path, text)
    docs, skipped = [], []
    for rec in records:
        try:
            if rec.error:
                raise RecordError("", rec.error)
            if not isinstance(rec.value, dict):
                raise RecordError("", f"expected a JSON object, got {_type_name(rec.value)}")
            doc = _string(rec.value, "text", "text")
            if not doc.strip():
                raise RecordError("text", "empty text")
            docs.append(doc)
        except RecordError as e:
            message = f"{rec.where}: {e}"
            if not skip_invalid:
                raise DataError(message + " (--skip_invalid skips bad records)") from None
            skipped.append(message)
    if not docs:
        raise DataError(f"{path}: no valid record ({len(skipped)} skipped"
                        + (f"; the first: {skipped[0]})" if skipped else ")"))
    return docs, skipped, sha


def is_text_file(path) -> bool:
    """True for raw pre-training text: a .txt file, or records with a 'text' field."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        return True
    try:  # look at the first record only; errors are reported when the file is read for real
        with open(path, encoding="utf-8-sig") as fh:
            head = fh.read(1 << 20).lstrip()
        if head.startswith("["):
            first, _ = json.JSONDecoder().raw_decode(head, len(head) - len(head[1:].lstrip()))
        else:
            first = json.loads(head.split("\n", 1)[0])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(first, dict) and "text" in first and not {"conversations", "messages", "instruction",
                                                                "output"} & first.keys()


# ---- writing ----------------------------------------------------------------------------------
def to_sharegpt(messages: list[dict], record_id: str) -> dict:
    """The conversation record MindFormers' alpaca_converter writes (`id`, `conversations`)."""
    return {"id": record_id, "conversations": [{"from": ROLE_TO_SHAREGPT[m["role"]], "value": m["content"]}
                                               for m in messages]}


def write_jsonl_atomic(records, out_path) -> None:
    """UTF-8 JSONL with every character as is (ensure_ascii=False), written to a temp file then renamed."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_path) as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def convert(input_path, output_path, skip_invalid: bool = False) -> tuple[int, list[str], str]:
    """Alpaca / ShareGPT / OpenAI messages -> conversation JSONL. Returns (written, skipped, format)."""
    loaded = load_samples(input_path, skip_invalid)
    samples, skipped, fmt = loaded.samples, loaded.skipped, loaded.format
    # Ids count from 1, as alpaca_converter's do; a record's own id is kept.
    write_jsonl_atomic((to_sharegpt(s.messages, s.id or str(i)) for i, s in enumerate(samples, start=1)),
                       output_path)
    return len(samples), skipped, fmt
