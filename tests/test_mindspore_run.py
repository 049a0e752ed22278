"""The seed's command line on MindFormers' own inputs: `petformers run` fine-tunes from a MindSpore `.ckpt` on a
MindRecord with no tokenizer, each row's loss is MindFormers' (inputs input_ids[:-1], targets labels[1:], masked at
-100 and at pad inputs), a base + mindpet LoRA checkpoint starts the adapter, torchrun (2 ranks, gloo) gives the
one-process adapter, and `convert --from peft --to mindspore` writes the adapter back as `.ckpt` (alone or merged)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from conftest import MINDSPORE_FIXTURES
from petformers.checkpoint.load import load_pretrained
from petformers.checkpoint.mindspore_ckpt import read_ckpt, write_ckpt
from petformers.checkpoint.mindspore_lora import mindpet_lora_tensors
from petformers.cli.main import main
from petformers.models.config import LlamaConfig

pytestmark = pytest.mark.skipif(not MINDSPORE_FIXTURES.exists(), reason="MindSpore fixtures not present")

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "configs" / "tiny" / "lora_tiny_mindspore.yaml"
SEED_YAML = REPO / "configs" / "llama2" / "lora_llama2_7b.yaml"
BASE = MINDSPORE_FIXTURES / "tiny_llama.ckpt"
LORA = MINDSPORE_FIXTURES / "tiny_llama_lora.ckpt"
RECORD = MINDSPORE_FIXTURES / "alpaca_tiny.mindrecord"
META = json.loads((MINDSPORE_FIXTURES / "tiny_llama.json").read_text()) if MINDSPORE_FIXTURES.exists() else {}
ROWS = json.loads((MINDSPORE_FIXTURES / "alpaca_tiny.json").read_text())["rows"] if MINDSPORE_FIXTURES.exists() \
    else []
SCALING = 4.0  # lora_alpha 16 / lora_rank 4
ADAPTED = ("wq", "wk", "wv", "wo")


def seed_command(ckpt: Path, out: Path, *extra: str, parallel: bool = False) -> list[str]:
    """The seed's msrun command line, with the tiny YAML and the fixture files."""
    return ["run", "--config", str(TINY_YAML), "--train_dataset_dir", str(RECORD), "--load_checkpoint", str(ckpt),
            "--auto_trans_ckpt", "False", "--use_parallel", str(parallel), "--run_mode", "finetune",
            "--output_dir", str(out), *extra]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def yaml_config() -> LlamaConfig:
    mc = yaml.safe_load(TINY_YAML.read_text())["model"]["model_config"]
    return LlamaConfig.from_mindformers({k: v for k, v in mc.items() if k != "pet_config"})


@torch.no_grad()
def reference_model(lora: bool):
    """The fixture model with the LoRA update folded in by hand (W + 4·B@A from the raw mindpet tensors),
    checked against the logits MindFormers 2.1.0 computed."""
    model, _ = load_pretrained(BASE, config=yaml_config(), with_tokenizer=False)
    if lora:
        raw = read_ckpt(LORA)
        for layer in range(2):
            for w in ADAPTED:
                prefix = f"model.layers.{layer}.attention.{w}"
                delta = raw[f"{prefix}.mindpet_delta_lora_b"] @ raw[f"{prefix}.mindpet_delta_lora_a"]
                model.get_submodule(f"layers.{layer}.attention.{w}").weight += SCALING * delta
    logits = model(torch.tensor(META["logits"]["input_ids"])).numpy()
    expected = np.load(MINDSPORE_FIXTURES / ("tiny_llama_lora_logits.npy" if lora else "tiny_llama_logits.npy"))
    assert np.abs(logits - expected).max() < 1e-4
    return model


@torch.no_grad()
def mindformers_loss(model, rows: list[dict], pad_id: int = 0) -> float:
    """LlamaForCausalLM.construct's loss: tokens = input_ids[:, :-1], labels = labels[:, 1:], mean over the
    tokens whose label is not -100 and whose input is not pad."""
    ids = torch.tensor([r["input_ids"] for r in rows])
    labels = torch.tensor([r["labels"] for r in rows])
    tokens, targets = ids[:, :-1], labels[:, 1:]
    mask = (targets != -100) & (tokens != pad_id)
    logits = model(tokens)
    return F.cross_entropy(logits[mask].float(), targets[mask]).item()


def lora_only_ckpt(path: Path) -> Path:
    """The mindpet tensors of tiny_llama_lora.ckpt alone, as MindFormers saves trainable parameters."""
    raw = read_ckpt(LORA)
    return write_ckpt(path, {n: t for n, t in raw.items() if "mindpet_delta_lora" in n})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small to split over threads; on a busy 2-core machine two threads are ~4x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seed") / "out"
    assert main(seed_command(BASE, out)) == 0
    return out


def test_seed_command_line_fine_tunes_a_mindspore_ckpt_on_a_mindrecord_without_tokenizer(seed_run):
    curve = losses(seed_run)
    assert len(curve) == 20  # 4 epochs x 20 rows / batch 4
    assert sum(curve[-5:]) / 5 < curve[0] - 0.3, curve
    assert json.loads((seed_run / "data_summary.json").read_text())["format"] == "mindrecord"
    adapter = load_file(str(seed_run / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 16 and any(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)


@pytest.mark.parametrize("start,pad_id", [("base ckpt", 0), ("base ckpt", 12), ("base + LoRA ckpt directory", 0)])
def test_first_step_loss_is_mindformers_loss_on_the_fixture_rows(tmp_path, start, pad_id):
    """pad_id 12 (model_config.pad_token_id) masks the targets of rows 0-3 wherever their input token is 12."""
    ckpt = BASE
    if start != "base ckpt":  # MindFormers combines every .ckpt of a --load_checkpoint directory
        ckpt = tmp_path / "ckpt"
        ckpt.mkdir()
        os.symlink(BASE, ckpt / BASE.name)
        lora_only_ckpt(ckpt / "tiny_llama_lora_only.ckpt")
    out = tmp_path / "out"
    assert main(seed_command(ckpt, out, "max_steps=1", "train_dataset.data_loader.shuffle=False",
                             f"model.model_config.pad_token_id={pad_id}")) == 0
    model = reference_model(lora=start != "base ckpt")
    expected = mindformers_loss(model, ROWS[:4], pad_id)
    assert abs(losses(out)[0] - expected) < 1e-5, (losses(out)[0], expected)
    if pad_id:
        assert abs(expected - mindformers_loss(model, ROWS[:4])) > 1e-3  # the pad rule mattered


def test_eval_of_a_lora_ckpt_merges_its_mindpet_tensors(tmp_path):
    out = tmp_path / "eval"
    assert main(["run", "--config", str(TINY_YAML), "--run_mode", "eval", "--eval_dataset_dir", str(RECORD),
                 "--load_checkpoint", str(LORA), "--output_dir", str(out)]) == 0
    result = json.loads((out / "eval_results.json").read_text())["metrics"]["eval_loss"]
    assert abs(result - mindformers_loss(reference_model(lora=True), ROWS)) < 1e-5


def test_torchrun_two_ranks_gives_the_one_process_adapter(seed_run, tmp_path):
    from petformers.distributed import parallel

    if not hasattr(parallel, "wrap_model"):
        pytest.skip("petformers.distributed.parallel.wrap_model is not built yet (data-parallel issue)")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "petformers", *seed_command(BASE, out, "runner_config.batch_size=2", parallel=True)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (load_file(str(o / "adapter" / "adapter_model.safetensors")) for o in (seed_run, out))
    assert sorted(one) == sorted(two)
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert losses(out) == pytest.approx(losses(seed_run), abs=1e-5)


def test_adapter_written_back_as_mindformers_ckpt_reads_back_the_same(seed_run, tmp_path, capsys):
    adapter = load_file(str(seed_run / "adapter" / "adapter_model.safetensors"))
    peft = {(layer, w, ab): adapter[f"base_model.model.model.layers.{layer}.self_attn.{hf}.lora_{ab.upper()}.weight"]
            for layer in range(2) for w, hf in zip(ADAPTED, ("q_proj", "k_proj", "v_proj", "o_proj"))
            for ab in ("a", "b")}
    out = tmp_path / "ms"
    assert main(["convert", "--from", "peft", str(seed_run / "adapter"), "--to", "mindspore",
                 "--output_dir", str(out)]) == 0
    trainable = out / "adapter.ckpt"
    assert capsys.readouterr().out.strip() == str(trainable)
    entries = read_ckpt(trainable)
    names = [f"model.layers.{layer}.attention.{w}.mindpet_delta_lora_{ab}" for layer in range(2) for w in ADAPTED
             for ab in ("a", "b")]
    assert list(entries) == names  # MindFormers' order, trainable parameters only
    for (layer, w, ab), tensor in peft.items():
        assert torch.equal(entries[f"model.layers.{layer}.attention.{w}.mindpet_delta_lora_{ab}"], tensor)
    # Beside the base .ckpt it is a --load_checkpoint directory again, with the same adapter.
    ckpt = tmp_path / "again"
    ckpt.mkdir()
    os.symlink(BASE, ckpt / BASE.name)
    os.symlink(trainable, ckpt / trainable.name)
    back = mindpet_lora_tensors(ckpt, yaml_config())
    assert all(torch.equal(back[f"layers.{layer}.attention.{w}.lora_{ab}.weight"], t) for (layer, w, ab), t in
               peft.items())

    assert main(["convert", "--from", "peft", str(seed_run / "adapter"), "--to", "mindspore", "--output_dir",
                 str(out), "--merged", "--load_checkpoint", str(BASE), "--config", str(TINY_YAML)]) == 0
    merged = read_ckpt(out / "adapter_merged.ckpt")
    base = read_ckpt(BASE)
    assert list(merged) == list(base)  # MindFormers names and order, no LoRA tensors
    for name, weight in base.items():
        parts = name.split(".")
        if len(parts) == 6 and parts[4] in ADAPTED:  # model.layers.N.attention.wq.weight
            layer, w = int(parts[2]), parts[4]
            weight = weight + SCALING * peft[(layer, w, "b")] @ peft[(layer, w, "a")]
            assert torch.allclose(merged[name], weight, atol=1e-6), name
        else:
            assert torch.equal(merged[name], weight), name


def test_raw_data_without_tokenizer_and_lora_without_pet_config_are_clear_errors(tmp_path, capsys):
    raw = tmp_path / "train.json"
    raw.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}] * 8))
    assert main(["run", "--config", str(TINY_YAML), "--train_dataset_dir", str(raw), "--load_checkpoint", str(BASE),
                 "--output_dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "processor.tokenizer" in err and str(raw) in err and "MindRecord" in err

    cfg = yaml.safe_load(TINY_YAML.read_text())
    del cfg["model"]["model_config"]["pet_config"]
    no_pet = tmp_path / "no_pet.yaml"
    no_pet.write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(no_pet), "--train_dataset_dir", str(RECORD), "--load_checkpoint", str(LORA),
                 "--run_mode", "train", "--output_dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model.model_config.pet_config" in err and "mindpet LoRA" in err


def test_dry_runs_size_the_seed_and_the_tiny_configs(capsys):
    assert main(["run", "--config", str(SEED_YAML), "--dry_run"]) == 0
    assert "trainable parameters: 16,777,216" in capsys.readouterr().out
    assert main(["run", "--config", str(TINY_YAML), "--train_dataset_dir", str(RECORD), "--load_checkpoint",
                 str(BASE), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "trainable parameters: 3,584" in out and "steps per epoch: 5" in out and "total steps: 20" in out
