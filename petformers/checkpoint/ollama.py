"""An Ollama `Modelfile` beside a merged GGUF, so `ollama create NAME -f Modelfile` works unedited.

Ollama's TEMPLATE is a Go template, not Jinja, so the chat template is translated by family: the
conversation format is recognised from its marker tokens (ChatML, Llama 3, Llama 2 / Mistral
[INST]) and written in Ollama's syntax. A default system prompt the Jinja template inserts
(SmolLM2's, Qwen's) becomes SYSTEM, found by rendering the template itself with no system message.
"""

from __future__ import annotations

import logging
from pathlib import Path

from petformers import atomic
from petformers.tokenizer import render_chat_template

log = logging.getLogger(__name__)

CHATML = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
LLAMA3 = (
    "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
INST = (
    "{{- range $i, $m := .Messages }}{{- if eq $m.Role \"user\" }}[INST] "
    "{{ if and $.System (eq $i 0) }}{{ $.System }}\n\n{{ end }}{{ $m.Content }} [/INST]"
    "{{- else if eq $m.Role \"assistant\" }} {{ $m.Content }}</s>{{ end }}{{ end }}"
)

_PROBE = "\x00probe\x00"


def template_family(chat_template: str | None) -> str | None:
    """'chatml' | 'llama3' | 'inst' | None, from the marker tokens a Jinja chat template writes."""
    if not chat_template:
        return None
    if "<|im_start|>" in chat_template:
        return "chatml"
    if "<|start_header_id|>" in chat_template:
        return "llama3"
    if "[INST]" in chat_template:
        return "inst"
    return None


def default_system_prompt(chat_template: str, family: str, bos: str, eos: str) -> str | None:
    """The system prompt the template adds when the conversation has none (rendered, not parsed)."""
    text = render_chat_template(chat_template, [{"role": "user", "content": _PROBE}], True,
                                bos_token=bos, eos_token=eos)
    head = text.split(_PROBE)[0]
    if family == "chatml" and "<|im_start|>system\n" in head:
        return head.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0]
    if family == "llama3" and "<|start_header_id|>system<|end_header_id|>\n\n" in head:
        return head.split("<|start_header_id|>system<|end_header_id|>\n\n", 1)[1].split("<|eot_id|>", 1)[0]
    return None


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile_text(gguf_name: str, tokenizer) -> str:
    """The Modelfile for `gguf_name` (a path relative to the Modelfile)."""
    lines = [f"FROM ./{gguf_name}"]
    template = getattr(tokenizer, "chat_template", None)
    family = template_family(template)
    if family is not None:
        go = {"chatml": CHATML, "llama3": LLAMA3, "inst": INST}[family]
        lines.append(f"TEMPLATE {_quote(go)}")
        system = default_system_prompt(template, family, tokenizer.bos_token or "", tokenizer.eos_token or "")
        if system:
            lines.append(f"SYSTEM {_quote(system)}")
    elif template:
        log.warning("the chat template is not one petformers translates for Ollama (ChatML, Llama 3, "
                    "[INST]); the Modelfile has no TEMPLATE, so Ollama uses the GGUF's own")
    stops = [tokenizer.id_to_token(i) for i in tokenizer.eos_ids]
    if family == "chatml" and "<|im_end|>" not in stops:
        stops.append("<|im_end|>")
    if family == "llama3" and "<|eot_id|>" not in stops:
        stops.append("<|eot_id|>")
    for stop in dict.fromkeys(stops):
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, tokenizer) -> Path:
    """`Modelfile` beside the GGUF (atomic)."""
    gguf_path = Path(gguf_path)
    out = gguf_path.parent / "Modelfile"
    atomic.write_text(out, modelfile_text(gguf_path.name, tokenizer))
    return out
