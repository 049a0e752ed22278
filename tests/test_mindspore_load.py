"""MindFormers checkpoints into petformers: the logits MindFormers 2.1.0 itself computed (base and
LoRA), every --load_checkpoint layout, adapters written back as .ckpt, and clear errors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import MINDSPORE_FIXTURES
from petformers.checkpoint.load import load_pretrained
from petformers.checkpoint.mindspore_ckpt import read_ckpt, write_ckpt
from petformers.checkpoint.mindspore_load import iter_base_tensors
from petformers.checkpoint.mindspore_lora import merge_lora_tensors, mindpet_lora_tensors
from petformers.checkpoint.mindspore_save import save_mindformers_ckpt
from petformers.errors import AdapterError, CheckpointError
from petformers.models.config import LlamaConfig

pytestmark = pytest.mark.skipif(not MINDSPORE_FIXTURES.exists(), reason="MindSpore fixtures not present")

META = json.loads((MINDSPORE_FIXTURES / "tiny_llama.json").read_text()) if MINDSPORE_FIXTURES.exists() else {}
BASE = MINDSPORE_FIXTURES / "tiny_llama.ckpt"
LORA = MINDSPORE_FIXTURES / "tiny_llama_lora.ckpt"
TOL = 1e-4


def config(**changes) -> LlamaConfig:
    return LlamaConfig.from_mindformers(META["config"] | changes)


def pet_config():
    from petformers.pet import PetConfig

    lora = META["lora"]
    return PetConfig(lora_rank=lora["lora_rank"], lora_alpha=lora["lora_alpha"], lora_dropout=0.0,
                     target_modules=lora["target_modules"])


def input_ids() -> torch.Tensor:
    return torch.tensor(META["logits"]["input_ids"])


def reference(name: str) -> np.ndarray:
    return np.load(MINDSPORE_FIXTURES / name)


@torch.no_grad()
def logits(model) -> np.ndarray:
    return model(input_ids()).float().numpy()


def load(path, **changes):
    model, _ = load_pretrained(path, config=config(**changes), with_tokenizer=False)
    return model


def load_with_lora(path):
    from petformers.pet import apply_lora, load_lora_state_dict

    model = load(path)
    apply_lora(model, pet_config())
    load_lora_state_dict(model, mindpet_lora_tensors(path, model.config), source=str(path))
    return model


# ---- the numbers MindFormers gives ------------------------------------------------------------

def test_base_checkpoint_gives_mindformers_logits():
    assert config().intermediate_size == META["config"]["computed_ffn_hidden_size"] == 192
    assert np.abs(logits(load(BASE)) - reference("tiny_llama_logits.npy")).max() < TOL


def test_lora_checkpoint_gives_mindformers_lora_logits():
    lora = mindpet_lora_tensors(LORA, config())
    assert sorted(lora) == sorted(f"layers.{i}.attention.{m}.lora_{ab}.weight"
                                  for i in range(2) for m in ("wq", "wk", "wv", "wo") for ab in "ab")
    assert lora["layers.0.attention.wk.lora_a.weight"].shape == (4, 64)
    assert lora["layers.0.attention.wk.lora_b.weight"].shape == (32, 4)
    assert np.abs(logits(load_with_lora(LORA)) - reference("tiny_llama_lora_logits.npy")).max() < TOL


def test_lora_merged_by_hand_gives_the_same_logits():
    base = dict(iter_base_tensors(LORA, config()))
    merged = merge_lora_tensors(base, mindpet_lora_tensors(LORA), {"lora_alpha": 16})
    model = load(BASE)
    model.load_state_dict(merged, strict=False)
    assert np.abs(logits(model) - reference("tiny_llama_lora_logits.npy")).max() < TOL


def test_bf16_checkpoint_loads_into_a_float32_model():
    model = load(MINDSPORE_FIXTURES / "tiny_llama_bf16.ckpt")
    f32 = load(BASE)
    for (name, p), q in zip(model.state_dict().items(), f32.state_dict().values()):
        assert p.dtype == torch.float32 and torch.equal(p, q.to(torch.bfloat16).float()), name
    assert np.abs(logits(model) - reference("tiny_llama_logits.npy")).max() < 0.05


def test_base_tensors_skip_lora_and_keep_file_dtype():
    names = [n for n, _ in iter_base_tensors(LORA, config())]
    assert len(names) == 21 and not any("lora" in n for n in names)
    assert names[0] == "tok_embeddings.weight" and "norm.weight" in names and "lm_head.weight" in names
    assert {t.dtype for _, t in iter_base_tensors(MINDSPORE_FIXTURES / "tiny_llama_bf16.ckpt", config())} == \
        {torch.bfloat16}


# ---- --load_checkpoint layouts ----------------------------------------------------------------

def _split(entries: dict, lora: bool) -> dict:
    return {k: v for k, v in entries.items() if ("mindpet_delta" in k) == lora}


def test_directory_of_base_and_lora_files_is_combined(tmp_path):
    entries = read_ckpt(LORA)
    write_ckpt(tmp_path / "llama2_7b.ckpt", _split(entries, lora=False))
    write_ckpt(tmp_path / "lora.ckpt", _split(entries, lora=True) | {"epoch_num": 2, "adam_m.x": torch.ones(2)})
    assert np.abs(logits(load_with_lora(tmp_path)) - reference("tiny_llama_lora_logits.npy")).max() < TOL
    shutil.copy(tmp_path / "llama2_7b.ckpt", tmp_path / "copy.ckpt")
    with pytest.raises(CheckpointError, match=r"'model.tok_embeddings.embedding_weight' is in both copy.ckpt and "
                                              r"llama2_7b.ckpt"):
        load(tmp_path)


def test_rank_layout_data_parallel_uses_rank_0(tmp_path):
    entries = read_ckpt(BASE)
    optimizer = {f"adam_m.{k}": torch.zeros_like(v) for k, v in entries.items()} | {"global_step": 10}
    for rank in range(2):
        (tmp_path / f"rank_{rank}").mkdir()
        old = write_ckpt(tmp_path / f"rank_{rank}" / f"llama_rank_{rank}-1_1.ckpt",
                         {k: torch.zeros_like(v) for k, v in entries.items()})
        os.utime(old, (1_000_000, 1_000_000))  # an older save: MindFormers takes the newest
        write_ckpt(tmp_path / f"rank_{rank}" / f"llama_rank_{rank}-2_1.ckpt", entries | optimizer)
    assert np.abs(logits(load(tmp_path)) - reference("tiny_llama_logits.npy")).max() < TOL


def test_rank_layout_model_parallel_slices_are_concatenated(tmp_path):
    entries = read_ckpt(BASE)
    for rank in range(2):
        shard = {}
        for name, value in entries.items():
            axis = 1 if any(k in name for k in ("wo.", "w2.", "embedding")) else 0
            shard[name] = value.chunk(2, dim=axis)[rank].contiguous() if value.dim() == 2 else value
        (tmp_path / f"rank_{rank}").mkdir()
        write_ckpt(tmp_path / f"rank_{rank}" / "net.ckpt", shard)
    assert read_ckpt(tmp_path / "rank_1" / "net.ckpt")["model.layers.0.attention.wq.weight"].shape == (32, 64)
    assert np.abs(logits(load(tmp_path)) - reference("tiny_llama_logits.npy")).max() < TOL


# ---- adapters back to MindFormers -------------------------------------------------------------

def test_full_save_of_a_lora_model_is_byte_identical_to_mindspores(tmp_path):
    out = save_mindformers_ckpt(load_with_lora(LORA), tmp_path / "full.ckpt", mode="full")
    assert out.read_bytes() == LORA.read_bytes()


def test_trainable_and_merged_saves(tmp_path):
    model = load_with_lora(LORA)
    trainable = read_ckpt(save_mindformers_ckpt(model, tmp_path / "lora.ckpt", mode="trainable"))
    original = read_ckpt(LORA)
    assert list(trainable) == [k for k in original if "mindpet_delta" in k]
    assert all(torch.equal(v, original[k]) for k, v in trainable.items())

    merged_file = save_mindformers_ckpt(model, tmp_path / "merged.ckpt", mode="merged", dtype=torch.float32)
    merged = read_ckpt(merged_file)
    assert list(merged) == [k for k in original if "mindpet_delta" not in k]
    assert np.abs(logits(load(merged_file)) - reference("tiny_llama_lora_logits.npy")).max() < TOL

    # From a plain state dict, the scaling comes from pet_config.
    state = dict(iter_base_tensors(LORA, config())) | mindpet_lora_tensors(LORA)
    again = read_ckpt(save_mindformers_ckpt(state, tmp_path / "m2.ckpt", mode="merged", pet_config=pet_config()))
    assert all(torch.allclose(again[k], merged[k], atol=1e-6) for k in merged)
    with pytest.raises(AdapterError, match="needs lora_alpha"):
        save_mindformers_ckpt(state, tmp_path / "m3.ckpt", mode="merged")
    with pytest.raises(AdapterError, match="nothing trainable"):
        save_mindformers_ckpt(dict(iter_base_tensors(BASE, config())), tmp_path / "m4.ckpt")


def test_short_finetune_on_mindrecord_and_adapter_round_trip(tmp_path):
    from petformers.data.mindrecord import MindRecordDataset
    from petformers.pet import apply_lora, load_lora_state_dict, lora_state_dict

    torch.manual_seed(0)
    model = load(BASE)
    apply_lora(model, pet_config())
    data = torch.utils.data.DataLoader(MindRecordDataset(MINDSPORE_FIXTURES / "alpaca_tiny.mindrecord", pad_id=0),
                                       batch_size=5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def loss_of(batch):
        out = model(batch["input_ids"].long(), position_ids=batch["position_ids"].long())
        return F.cross_entropy(out.flatten(0, 1), batch["targets"].long().flatten(), ignore_index=-100)

    batches = list(data)
    with torch.no_grad():
        before = loss_of(batches[0]).item()
    model.train()
    for batch in batches:
        loss_of(batch).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert loss_of(batches[0]).item() < before
    model.eval()
    trained = lora_state_dict(model)
    assert any(t.abs().sum() > 0 for n, t in trained.items() if "lora_b" in n)

    shutil.copy(BASE, tmp_path / "base.ckpt")
    save_mindformers_ckpt(model, tmp_path / "adapter.ckpt", mode="trainable")
    back = mindpet_lora_tensors(tmp_path, config())
    assert sorted(back) == sorted(trained) and all(torch.equal(back[n], trained[n]) for n in trained)
    fresh = load(tmp_path)
    apply_lora(fresh, pet_config())
    load_lora_state_dict(fresh, back)
    assert np.array_equal(logits(fresh), logits(model))


# ---- names or shapes that do not fit: one clear error -----------------------------------------

def test_shape_that_does_not_fit_the_config():
    with pytest.raises(CheckpointError, match=r"tiny_llama.ckpt: 'model.layers.0.attention.wk.weight' has shape "
                                              r"\[32, 64\] but model_config \(.*n_kv_heads 4.*\) gives \[64, 64\]"):
        load(BASE, n_kv_heads=4)
    with pytest.raises(CheckpointError, match=r"'model.tok_embeddings.embedding_weight' has shape \[256, 64\].*"
                                              r"gives \[256, 128\]"):
        load(BASE, hidden_size=128)


def test_layers_missing_or_extra():
    with pytest.raises(CheckpointError, match=r"missing model.layers.2.attention_norm.weight, .* and 6 more"):
        load(BASE, num_layers=3)
    with pytest.raises(CheckpointError, match=r"'model.layers.1.ffn_norm.weight' does not exist in a model"):
        load(BASE, num_layers=1)


def test_lora_only_checkpoint(tmp_path):
    write_ckpt(tmp_path / "lora.ckpt", _split(read_ckpt(LORA), lora=True))
    with pytest.raises(CheckpointError, match=r"missing .*LoRA-only checkpoint"):
        load(tmp_path / "lora.ckpt")
    write_ckpt(tmp_path / "half.ckpt", {"model.layers.0.attention.wq.mindpet_delta_lora_a": torch.zeros(4, 64)})
    with pytest.raises(CheckpointError, match=r"'model.layers.0.attention.wq.mindpet_delta_lora_a' has no "
                                              r"matching lora_b"):
        mindpet_lora_tensors(tmp_path / "half.ckpt")


def test_unknown_model_tensor_and_empty_directory(tmp_path):
    entries = read_ckpt(BASE) | {"model.layers.0.attention.w_qkv.weight": torch.zeros(128, 64)}
    write_ckpt(tmp_path / "qkv.ckpt", entries)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.attention.w_qkv.weight' is not a MindFormers Llama "
                                              r"parameter.*qkv_concat"):
        load(tmp_path / "qkv.ckpt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "rank_0").mkdir()
    with pytest.raises(CheckpointError, match=r"rank_0: no .ckpt file"):
        list(iter_base_tensors(tmp_path / "empty", config()))
