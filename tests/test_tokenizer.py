"""The Tokenizer against transformers' tokenizer for the same directory: ids, Unicode round trips,
chat templates rendered identically, the template sandbox, fingerprints."""

from __future__ import annotations

import json
import shutil

import pytest

from petformers.errors import TokenizerError
from petformers.tokenizer import Tokenizer, render_chat_template

UNICODE = ["把这句话翻译成英文。你好，世界！", "emoji 🎉🚀 and a family 👨‍👩‍👧", "مرحبا بالعالم (Arabic, right to left)",
           "mixed: naïve café — Ünïcödé ½ ∑ 𝔘", "  leading spaces\tand\ttabs\nand lines\n"]

CONVERSATION = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi! 你好 🎉"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Name a \"quoted\" colour, with {braces}."}]

# Templates in the styles models ship: each uses a Jinja feature the renderer must match transformers on.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n\\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] | trim }}
    {%- else %}
        {{- message['content'] | tojson }}
    {%- endif %}
    {{- eos_token }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n\\n' }}
{%- endif %}
"""
BLOCKS_TEMPLATE = """{% set ns = namespace(turns=0) %}
{% for message in messages %}
  {% if message.role == 'system' %}{% continue %}{% endif %}
  {% set ns.turns = ns.turns + 1 %}
  {{ ns.turns }}. {{ message.role | upper }}: {{ message.content | tojson }}
  {% if ns.turns >= 2 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}ASSISTANT:{% endif %}"""


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return Tokenizer.from_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def hf_tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def with_template(tmp_path, tiny_model_dir, template):
    path = shutil.copytree(tiny_model_dir, tmp_path / "tok", ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("text", UNICODE)
def test_unicode_round_trip_and_ids_equal_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.encode_batch([text, text]) == [ids, ids]


def test_special_tokens(tok, hf_tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
    assert tok.eos_ids == [2]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # special tokens written in text are single tokens
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")  # add_bos_token is false


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chatml_template_equals_transformers(tok, hf_tok, add_generation_prompt):
    for messages in (CONVERSATION, CONVERSATION[1:2]):
        ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert ours == theirs
        assert tok.encode(ours) == hf_tok(theirs, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("template", [LLAMA2_TEMPLATE, LLAMA3_TEMPLATE, BLOCKS_TEMPLATE],
                         ids=["llama2-raise_exception", "llama3-whitespace-control", "namespace-loopcontrols"])
def test_other_templates_equal_transformers(tmp_path, tiny_model_dir, template):
    from transformers import AutoTokenizer

    path = with_template(tmp_path, tiny_model_dir, template)
    ours, theirs = Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(str(path))
    messages = CONVERSATION[:3] if template is LLAMA2_TEMPLATE else CONVERSATION
    for gen in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == \
            theirs.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)


def test_template_raise_exception_becomes_tokenizer_error(tmp_path, tiny_model_dir):
    tok = Tokenizer.from_dir(with_template(tmp_path, tiny_model_dir, LLAMA2_TEMPLATE))
    with pytest.raises(TokenizerError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_chat_template_from_jinja_file(tmp_path, tiny_model_dir, tok):
    path = shutil.copytree(tiny_model_dir, tmp_path / "jinja", ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    template = cfg.pop("chat_template")
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "chat_template.jinja").write_text(template)
    assert Tokenizer.from_dir(path).apply_chat_template(CONVERSATION) == tok.apply_chat_template(CONVERSATION)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set x = messages.append({'role': 'user', 'content': 'injected'}) %}{{ messages }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
])
def test_sandbox_refuses_unsafe_templates(template):
    """Templates come from downloaded files: attribute escapes and mutation are refused, not run."""
    with pytest.raises(TokenizerError) as err:
        render_chat_template(template, [{"role": "user", "content": "hi"}], True)
    assert "\n" not in str(err.value)


def test_no_chat_template_is_a_clear_error(tmp_path, tiny_model_dir):
    path = shutil.copytree(tiny_model_dir, tmp_path / "plain", ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer.from_dir(path).apply_chat_template(CONVERSATION)


def test_fingerprint(tmp_path, tiny_model_dir, tiny_tokenizer_dir, tok):
    from conftest import write_tiny_tokenizer

    assert Tokenizer.from_dir(tiny_tokenizer_dir).fingerprint() == tok.fingerprint()
    tok.save_pretrained(tmp_path / "saved")
    again = Tokenizer.from_dir(tmp_path / "saved")
    assert again.fingerprint() == tok.fingerprint()
    assert again.apply_chat_template(CONVERSATION) == tok.apply_chat_template(CONVERSATION)
    other = Tokenizer.from_dir(write_tiny_tokenizer(tmp_path / "other", vocab_size=400))
    assert other.fingerprint() != tok.fingerprint()


def test_generation_config_eos_list(tmp_path, tiny_model_dir):
    path = shutil.copytree(tiny_model_dir, tmp_path / "eos", ignore=shutil.ignore_patterns("*.safetensors"))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert Tokenizer.from_dir(path).eos_ids == [0, 2]


def test_bad_tokenizer_files(tmp_path, tiny_model_dir):
    path = shutil.copytree(tiny_model_dir, tmp_path / "bad", ignore=shutil.ignore_patterns("*.safetensors"))
    (path / "tokenizer_config.json").write_text('{\n "bos_token": ,\n}')
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_dir(path)
    assert str(path / "tokenizer_config.json") in str(err.value) and "line 2" in str(err.value)
    (path / "tokenizer_config.json").unlink()
    (path / "tokenizer.json").write_text("{ truncated")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(path)
