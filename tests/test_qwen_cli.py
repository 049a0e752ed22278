"""`--enable_thinking` (Qwen3's chat template switch) on the commands that render prompts: `data prepare
--template chat` trains on what the template writes after the prompt, `predict --chat` generates from
the prompt transformers' apply_chat_template(enable_thinking=False) renders; on a template without the
switch the flag is reported as changing nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from family_models import write_family
from test_qwen_tokenizer import QWEN3_TEMPLATE, train_qwen_style

from petformers.checkpoint.load import load_pretrained
from petformers.cli.main import main
from petformers.data.dataset import PreparedDataset
from petformers.generate import GenerationConfig, generate

CONVERSATION = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}


@pytest.fixture(scope="module")
def qwen3_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_cli")
    tok_dir = train_qwen_style(root / "tok", template=QWEN3_TEMPLATE, vocab_size=400)
    return write_family(root / "model", "qwen3", seed=11, tokenizer_dir=tok_dir)


def trained_text(out_dir, tokenizer) -> tuple[str, str]:
    """(masked text, trained text) of the one prepared sample."""
    ds = PreparedDataset(out_dir)
    ids, targets = np.asarray(ds.arrays["input_ids"][0]), np.asarray(ds.arrays["targets"][0])
    trained = targets[targets != -100].tolist()
    first = int(np.nonzero(targets != -100)[0][0]) + 1  # targets[i] is the label of position i + 1
    return tokenizer.decode(ids[:first].tolist(), skip_special_tokens=False), \
        tokenizer.decode(trained, skip_special_tokens=False)


@pytest.mark.parametrize("flag", [[], ["--enable_thinking", "false"]], ids=["template-default", "no-thinking"])
def test_data_prepare_honours_enable_thinking(qwen3_model, tmp_path, capsys, flag):
    src = tmp_path / "conv.jsonl"
    src.write_text(json.dumps(CONVERSATION) + "\n", encoding="utf-8")
    out = tmp_path / "ds"
    assert main(["data", "prepare", "--input", str(src), "--tokenizer", str(qwen3_model), "--seq_length", "128",
                 "--template", "chat", "--output_dir", str(out), "--no_progress", *flag]) == 0
    tok = load_pretrained(qwen3_model, with_tokenizer=True)[1]
    prompt, answer = trained_text(out, tok)
    if flag:  # the empty think block belongs to the prompt, as the template writes it for generation
        assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and answer == "4<|im_end|>"
        assert PreparedDataset(out).meta["chat_template_kwargs"] == {"enable_thinking": False}
    else:  # the template writes the (empty) think block after the prompt: it is trained
        assert prompt.endswith("<|im_start|>assistant\n") and answer == "<think>\n\n</think>\n\n4<|im_end|>"
        assert "chat_template_kwargs" not in PreparedDataset(out).meta


def test_predict_chat_honours_enable_thinking(qwen3_model, capsys):
    from transformers import AutoTokenizer

    model, tok = load_pretrained(qwen3_model)
    hf = AutoTokenizer.from_pretrained(str(qwen3_model))
    prompt = [{"role": "user", "content": "Say hi."}]
    expected = {}
    for thinking in (True, False):
        ids = hf.apply_chat_template(prompt, add_generation_prompt=True, enable_thinking=thinking, tokenize=True,
                                     return_dict=False)
        ids = ids["input_ids"] if isinstance(ids, dict) else list(ids)
        out = generate(model, [ids], GenerationConfig(max_new_tokens=6), [], tok.pad_id)[0]
        expected[thinking] = tok.decode(out)
    assert expected[True] != expected[False]  # the prompts differ enough to change the answer
    for thinking in (True, False):
        assert main(["predict", "--load_checkpoint", str(qwen3_model), "--predict_data", "Say hi.", "--chat",
                     "--enable_thinking", str(thinking).lower(), "--max_new_tokens", "6", "--device", "cpu"]) == 0
        assert capsys.readouterr().out == expected[thinking] + "\n"


def test_enable_thinking_on_a_template_without_the_switch_is_reported(tiny_model_dir, capsys):
    assert main(["predict", "--load_checkpoint", str(tiny_model_dir), "--predict_data", "hi", "--chat",
                 "--enable_thinking", "false", "--max_new_tokens", "2", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "--enable_thinking false changes nothing" in err and str(tiny_model_dir) in err


def test_enable_thinking_takes_true_or_false_only(tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--load_checkpoint", str(tiny_model_dir), "--predict_data", "hi", "--enable_thinking", "maybe"])
    assert exc.value.code == 2 and "expected true or false" in capsys.readouterr().err


def test_chat_honours_enable_thinking(qwen3_model):
    """`petformers chat` (stdin/stdout) answers the first turn from the prompt rendered with enable_thinking=False."""
    import subprocess
    import sys

    model, tok = load_pretrained(qwen3_model)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Say hi."}], True, enable_thinking=False))
    expected = tok.decode(generate(model, [ids], GenerationConfig(max_new_tokens=6), tok.eos_ids, tok.pad_id)[0])
    done = subprocess.run([sys.executable, "-m", "petformers", "chat", "--load_checkpoint", str(qwen3_model),
                           "--enable_thinking", "false", "--max_new_tokens", "6", "--device", "cpu"],
                          input="Say hi.\n/exit\n", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == f"you> assistant> {expected}\nyou> ", done.stdout  # input()'s prompt goes to stdout


@pytest.mark.parametrize("how", ["yaml", "flag"])
def test_run_mode_predict_honours_enable_thinking_from_the_yaml_or_the_flag(qwen3_model, tmp_path, how):
    model, tok = load_pretrained(qwen3_model)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Say hi."}], True, enable_thinking=False))
    expected = tok.decode(generate(model, [ids], GenerationConfig(max_new_tokens=6), tok.eos_ids, tok.pad_id)[0])
    cfg = {"load_checkpoint": str(qwen3_model), "run_mode": "predict", "template": "chat", "max_new_tokens": 6,
           "output_dir": str(tmp_path / "out")}
    if how == "yaml":
        cfg["enable_thinking"] = False
    path = tmp_path / "predict.yaml"
    path.write_text(json.dumps(cfg), encoding="utf-8")  # JSON is YAML
    flag = ["--enable_thinking", "false"] if how == "flag" else []
    assert main(["run", "--config", str(path), "--predict_data", "Say hi.", *flag]) == 0
    (line,) = (tmp_path / "out" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(line)["answer"] == expected
    resolved = (tmp_path / "out" / "resolved_config.yaml").read_text(encoding="utf-8")
    assert "enable_thinking: false" in resolved
