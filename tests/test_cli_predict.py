"""`petformers predict` (run_mode predict): stdout carries only the generated text, errors are one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from petformers.checkpoint.load import load_pretrained
from petformers.cli.main import main
from petformers.generate import GenerationConfig, generate


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_pretrained(tiny_model_dir)


def expected_answer(loaded, prompt: str, max_new_tokens: int, chat: bool = False) -> str:
    model, tok = loaded
    text = tok.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    ids = tok.encode(text, add_special_tokens=not chat)
    return tok.decode(generate(model, [ids], GenerationConfig(max_new_tokens=max_new_tokens), tok.eos_ids,
                               tok.pad_id)[0])


def test_single_prompt_prints_only_the_answer(capsys, tiny_model_dir, loaded):
    rc = main(["predict", "--load_checkpoint", str(tiny_model_dir), "--predict_data", "hello",
               "--max_new_tokens", "5", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out == expected_answer(loaded, "hello", 5) + "\n"


def test_chat_prompt(capsys, tiny_model_dir, loaded):
    rc = main(["predict", "--load_checkpoint", str(tiny_model_dir), "--predict_data", "你好 🎉", "--chat",
               "--max_new_tokens", "6", "--device", "cpu"])
    assert rc == 0
    assert capsys.readouterr().out == expected_answer(loaded, "你好 🎉", 6, chat=True) + "\n"


@pytest.mark.parametrize("kind", ["lines", "json"])
def test_file_of_prompts_prints_one_json_line_each(tmp_path, capsys, tiny_model_dir, loaded, kind):
    prompts = ["hello", "Give three tips for staying healthy.", "把这句话翻译成英文", "a"]
    if kind == "lines":
        data = tmp_path / "prompts.txt"
        data.write_text("\n".join(prompts[:2]) + "\n\n" + "\n".join(prompts[2:]) + "\n", encoding="utf-8")
    else:
        data = tmp_path / "prompts.json"
        data.write_text(json.dumps(prompts, ensure_ascii=False), encoding="utf-8")
    rc = main(["predict", "--load_checkpoint", str(tiny_model_dir), "--predict_data", str(data),
               "--max_new_tokens", "4", "--batch_size", "3", "--device", "cpu"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["answer"] for line in lines] == [expected_answer(loaded, p, 4) for p in prompts]


def test_sampling_flags_are_seeded(capsys, tiny_model_dir):
    argv = ["predict", "--load_checkpoint", str(tiny_model_dir), "--predict_data", "hello", "--max_new_tokens", "8",
            "--do_sample", "--top_k", "40", "--top_p", "0.9", "--temperature", "1.2", "--repetition_penalty", "1.1",
            "--seed", "7", "--device", "cpu"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first


def test_missing_checkpoint_is_exit_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    rc = main(["predict", "--load_checkpoint", str(missing), "--predict_data", "hello"])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("petformers: error:") and str(missing) in lines[0]


def test_bad_prompt_file_is_exit_2(tmp_path, capsys, tiny_model_dir):
    data = tmp_path / "prompts.json"
    data.write_text('{"not": "a list"}')
    rc = main(["predict", "--load_checkpoint", str(tiny_model_dir), "--predict_data", str(data)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(data) in err[0]


def test_module_help_runs():
    result = subprocess.run([sys.executable, "-m", "petformers", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "predict" in result.stdout and "download" in result.stdout
    result = subprocess.run([sys.executable, "-m", "petformers", "predict", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    for flag in ("--load_checkpoint", "--predict_data", "--chat", "--max_new_tokens", "--do_sample", "--top_k",
                 "--top_p", "--temperature"):
        assert flag in result.stdout


def test_empty_prompt_is_exit_2(capsys, tiny_model_dir):
    rc = main(["predict", "--load_checkpoint", str(tiny_model_dir), "--predict_data", "", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "empty" in err[0]
