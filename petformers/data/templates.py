"""Prompt templates: a conversation -> pieces of text (or literal token ids), each trained or masked.

A piece is `(text_or_ids, trained)`. Masked pieces (system, user turns, role names) get label
-100; trained pieces (answers, each answer's end-of-turn / eos token) are learnt. Pieces are
tokenized one by one and concatenated (see `prepare.encode_samples`), so the boundary between a
prompt and its answer is a token boundary: the masked tokens decode exactly to the prompt text
and the trained tokens exactly to the answer text.

- `fastchat`: Vicuna v1.1 with MindFormers' system prompt, MindFormers' default
  (`llama_preprocess.py` + `conversation.py`). FastChat renders
  `{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>`; MindFormers tokenizes
  that text round by round (split at `</s>`), with bos before the first round and the eos id in
  place of each `</s>`, and masks bos plus everything up to and including `ASSISTANT:`. The
  space after `ASSISTANT:` belongs to the answer's first token (`▁Making` in SentencePiece,
  ` Making` in byte-level BPE), as it does when the model generates after the prompt.
- `alpaca`: Stanford Alpaca's plain prompt: `{prompt}{answer}</s>` per turn, with no separator
  (Stanford's train.py). A user turn that already is a Stanford prompt (as `data convert` writes
  Alpaca records) is used as is; any other user turn becomes the prompt's instruction. A system
  message, if any, goes first, followed by a blank line.
- `chat`: the model's own chat template (tokenizer_config.json or GGUF). The split between
  prompt and answer is found by rendering prefixes: the conversation up to each assistant turn
  with `add_generation_prompt=True` must be a prefix of the whole rendering; what follows it, up to
  and including the first end-of-turn token after the answer's text (e.g. `<|im_end|>`, any of
  the tokenizer's eos ids), is trained. bos is whatever the template writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from petformers.data.formats import PROMPT_INPUT, PROMPT_NO_INPUT, RecordError, alpaca_prompt
from petformers.errors import DataError, TokenizerError

TEMPLATES = ("fastchat", "alpaca", "chat")

# MindFormers' conversation.py, conv_vicuna_v1_1.
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")

Piece = tuple  # (str | list[int], bool trained)


@dataclass
class Template:
    """A template bound to a tokenizer (its bos/eos ids and end-of-turn tokens)."""

    name: str
    tokenizer: object
    bos: list[int] = field(init=False)
    eos: int | None = field(init=False)
    end_of_turn: list[str] = field(init=False)

    def __post_init__(self):
        if self.name not in TEMPLATES:
            raise DataError(f"unknown template {self.name!r}; choose one of {', '.join(TEMPLATES)}")
        tok = self.tokenizer
        self.bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
        self.eos = tok.eos_id
        self.end_of_turn = [tok.id_to_token(i) for i in tok.eos_ids]
        if self.name != "chat" and self.eos is None:
            raise DataError(f"{tok.source}: the tokenizer has no eos token; the {self.name} template ends "
                            "each answer with eos")
        if self.name == "chat" and not tok.chat_template:
            raise DataError(f"{tok.source}: the tokenizer has no chat template; use --template fastchat "
                            "or alpaca")

    def pieces(self, messages: list[dict]) -> list[Piece]:
        if self.name == "fastchat":
            return fastchat_pieces(messages, self.bos, self.eos)
        if self.name == "alpaca":
            return alpaca_pieces(messages, self.bos, self.eos)
        return chat_pieces(messages, self.tokenizer, self.end_of_turn)


def _split(messages: list[dict]) -> tuple[str | None, list[tuple[str, str]]]:
    """(system or None, [(user, assistant), ...]) of a checked conversation."""
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    return system, [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2)]


def fastchat_pieces(messages: list[dict], bos: list[int], eos: int) -> list[Piece]:
    system, turns = _split(messages)
    pieces: list[Piece] = [(bos, False)] if bos else []
    for k, (user, answer) in enumerate(turns):
        head = (system or VICUNA_SYSTEM) + " " if k == 0 else ""
        pieces += [(f"{head}USER: {user} ASSISTANT:", False), (" " + answer, True), ([eos], True)]
    return pieces


def is_alpaca_prompt(text: str) -> bool:
    return text.endswith("### Response:") and (text.startswith(PROMPT_INPUT[:60])
                                               or text.startswith(PROMPT_NO_INPUT[:60]))


def alpaca_pieces(messages: list[dict], bos: list[int], eos: int) -> list[Piece]:
    system, turns = _split(messages)
    pieces: list[Piece] = [(bos, False)] if bos else []
    for k, (user, answer) in enumerate(turns):
        prompt = user if is_alpaca_prompt(user) else alpaca_prompt(user)
        if k == 0 and system:
            prompt = system + "\n\n" + prompt
        pieces += [(prompt, False), (answer, True), ([eos], True)]
    return pieces


def chat_pieces(messages: list[dict], tokenizer, end_of_turn: list[str]) -> list[Piece]:
    def render(msgs, add_generation_prompt):
        try:
            return tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)
        except TokenizerError as e:  # e.g. the template's raise_exception on roles it does not accept
            raise RecordError("messages", str(e)) from None

    full = render(messages, False)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    starts = []
    for i in answers:
        prompt = render(messages[:i], True)
        if not full.startswith(prompt):
            raise RecordError("messages", "the chat template renders the prompt before this answer differently "
                              "from the whole conversation (a template that rewrites earlier turns cannot be "
                              "split into prompt and answer); use --template fastchat")
        starts.append(len(prompt))
    pieces: list[Piece] = []
    done = 0
    for n, (i, start) in enumerate(zip(answers, starts)):
        limit = starts[n + 1] if n + 1 < len(starts) else len(full)
        content = messages[i]["content"].strip()
        found = full.find(content, start, limit)
        search_from = found + len(content) if found >= 0 else start
        ends = [p + len(t) for t in end_of_turn if (p := full.find(t, search_from, limit)) >= 0]
        end = min(ends) if ends else limit
        pieces += [(full[done:start], False), (full[start:end], True)]
        done = end
    pieces.append((full[done:], False))
    return [p for p in pieces if p[0]]


def render_prompt(messages: list[dict], template: str, tokenizer) -> str:
    """The text a model sees before it answers the last (user) turn of `messages`, for generation.

    Earlier answers end with the eos token's text. bos is not included: encode the text with
    `add_special_tokens=True` (fastchat, alpaca); a chat template writes its own.
    """
    if template == "chat":
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    tpl = Template(template, tokenizer)
    pieces = tpl.pieces([*messages, {"role": "assistant", "content": "-"}])[:-2]  # without the dummy answer + eos
    if tpl.bos:
        pieces = pieces[1:]
    return "".join(value if isinstance(value, str) else tokenizer.eos_token or "" for value, _ in pieces)
