"""DDP over a quantized base (torchrun, gloo, 2 CPU processes): NF4 quantized at load and a tiny Q4_1
GGUF kept in its blocks. The quantized blocks are non-persistent buffers, replicated on every rank
(docs/quantization.md); the adapter of the 2-rank run equals a one-process run of the same global batch
(DDP's all-reduce keeps the ranks' adapters identical, so rank 0's saved adapter stands for both), and a
2-rank run stopped after its step-2 checkpoint resumes on 2 ranks to that same adapter. FSDP2 over the
GGUF base (float parts and adapter sharded, blocks whole on every rank) ends with the one-process adapter."""

from __future__ import annotations

import json
import shutil

import gguf
import pytest
import yaml

from test_distributed import STEPS, adapter, assert_same_adapter, config as _dist_config, single, torchrun  # noqa: F401
from test_gguf import write_gguf_from_hf


@pytest.fixture(scope="module")
def tiny_q4_1_gguf(tmp_path_factory, tiny_model_dir, tiny_tokenizer_dir):
    path = tmp_path_factory.mktemp("qgguf") / "tiny-Q4_1.gguf"
    write_gguf_from_hf(path, tiny_model_dir, tiny_tokenizer_dir, qtype=gguf.GGMLQuantizationType.Q4_1)
    return path


@pytest.mark.parametrize("qtype", ["nf4", "gguf"])
def test_ddp_over_a_quantized_base_matches_one_process_and_resumes(qtype, tmp_path, _dist_config, tiny_q4_1_gguf):
    cfg = yaml.safe_load(_dist_config.read_text())
    mc = cfg["model"]["model_config"]
    if qtype == "nf4":
        mc.update(quantization_bit=4, quantization_type="nf4", double_quantization=True)
    else:
        cfg["load_checkpoint"] = str(tiny_q4_1_gguf)
        mc.update(quantization_type="gguf")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")

    single(path, tmp_path / "one")
    done = torchrun(path, tmp_path / "two")
    assert "global batch 4 (1 x 2 ranks x 2 accumulation)" in done.stderr
    assert f"quantization_type: {qtype}" in (tmp_path / "two" / "resolved_config.yaml").read_text()
    one, two = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert any(v.abs().max() > 0 for k, v in one.items() if "lora_B" in k)
    assert_same_adapter(one, two)

    resumed = tmp_path / "resumed"  # the 2-rank run as if stopped right after its step-2 checkpoint
    shutil.copytree(tmp_path / "two", resumed)
    shutil.rmtree(resumed / "checkpoint" / f"step_{STEPS:08d}")
    shutil.rmtree(resumed / "adapter")
    done = torchrun(path, resumed, "--resume_training", "True")
    assert "step 2 of 4, saved by 2 rank(s)" in done.stderr
    assert_same_adapter(two, adapter(resumed), tol=0.0)


def test_fsdp2_over_a_gguf_base_kept_quantized_matches_one_process(tmp_path, _dist_config, tiny_q4_1_gguf):
    """FSDP2 shards the float parts and the adapter; the Q4_1 blocks stay whole on every rank."""
    cfg = yaml.safe_load(_dist_config.read_text())
    cfg["load_checkpoint"] = str(tiny_q4_1_gguf)
    cfg["model"]["model_config"]["quantization_type"] = "gguf"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    single(path, tmp_path / "one")
    torchrun(path, tmp_path / "two", "parallel_strategy=fsdp")
    assert json.loads((tmp_path / "two" / "checkpoint" / "step_00000002" / "trainer_state.json").read_text())[
        "layout"] == "sharded"
    assert_same_adapter(adapter(tmp_path / "one"), adapter(tmp_path / "two"))
