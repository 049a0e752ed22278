"""The defects issue 17 names, each pinned by a test that failed before its fix: a model directory's
index cannot make petformers read outside it (nor escape as a traceback when malformed),
`use_parallel: True` without torchrun is refused instead of training on one process, and saving the
same checkpoint step twice never leaves a moment without a complete checkpoint of that step."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from petformers.checkpoint import hf
from petformers.cli.main import main
from petformers.errors import CheckpointError
from petformers.checkpoint import training as checkpointing


def _model_copy(tiny_model_dir: Path, dest: Path) -> Path:
    shutil.copytree(tiny_model_dir, dest)
    return dest


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    last = err[-1]
    assert last.startswith("petformers: error: "), err[-5:]
    assert "Traceback" not in "\n".join(err)
    for needle in needles:
        assert needle in last, (needle, last)
    return last


@pytest.mark.parametrize("escape", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors"])
def test_index_weight_map_cannot_leave_the_model_directory(tmp_path, tiny_model_dir, capsys, escape):
    model = _model_copy(tiny_model_dir, tmp_path / "model")
    outside = tmp_path / "outside.safetensors"
    (model / "model.safetensors").rename(outside)  # a real, readable shard, just outside the directory
    name = str(outside) if escape == "ABSOLUTE" else escape
    keys = list(load_file(str(outside)))
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: name for k in keys}}))
    with pytest.raises(CheckpointError, match="leaves the directory|absolute path"):
        hf.weight_files(model)
    code = main(["predict", "--load_checkpoint", str(model), "--predict_data", "hello"])
    assert code == 2
    _one_line_error(capsys, str(index), "weight_map")


@pytest.mark.parametrize("content, needle", [
    ('{"weight_map": {"a": "model.safetensors",', "invalid JSON at line 1"),
    ('{"metadata": {}}', "weight_map: missing"),
    ('[1, 2]', "weight_map: missing"),
    ('{"weight_map": {"a": 7}}', "expected a file name"),
])
def test_a_malformed_index_is_one_line_naming_the_file(tmp_path, tiny_model_dir, capsys, content, needle):
    model = _model_copy(tiny_model_dir, tmp_path / "model")
    index = model / "model.safetensors.index.json"
    index.write_text(content)
    assert main(["predict", "--load_checkpoint", str(model), "--predict_data", "hello"]) == 2
    _one_line_error(capsys, str(index), needle)


def test_use_parallel_without_torchrun_is_refused_in_one_line(tmp_path, tiny_model_dir, alpaca_demo, capsys,
                                                               monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    records = [r for r in json.loads(alpaca_demo.read_text(encoding="utf-8"))
               if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 300][:8]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "out"
    code = main(["run", "--load_checkpoint", str(tiny_model_dir), "--train_dataset_dir", str(data), "--output_dir",
                 str(out), "--use_parallel", "True", "max_steps=1", "runner_config.batch_size=2",
                 "model.model_config.seq_length=192", "model.model_config.compute_dtype=float32",
                 "model.model_config.pet_config.pet_type=lora",
                 "model.model_config.pet_config.target_modules=.*wq", "template=chat"])
    assert code == 2
    _one_line_error(capsys, "use_parallel", "torchrun")
    assert not (out / "metrics.jsonl").exists() and not (out / "adapter").exists()


def _save(root: Path, step: int, value: float, reason: str) -> Path:
    tensors = {"w": torch.full((4, 4), value)}
    return checkpointing.save_checkpoint(root, step, tensors, {"state": {}, "param_groups": []},
                                         {"reason": reason}, keep_max=5)


def _complete(root: Path, step: int) -> dict | None:
    """The trainer state and tensors of root/step_N when it is a complete checkpoint, else None."""
    path = root / f"step_{step:08d}"
    if path not in checkpointing.list_checkpoints(root):
        return None
    trainable, _, _, state = checkpointing.load_checkpoint(path)
    return {"reason": state["reason"], "w": trainable["w"][0, 0].item()}


def test_saving_the_same_step_twice_always_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoint"
    _save(root, 2, 1.0, "periodic")
    seen = []

    def checked(fn):
        def wrapper(*args, **kwargs):
            seen.append(_complete(root, 2))
            result = fn(*args, **kwargs)
            seen.append(_complete(root, 2))
            return result
        return wrapper

    # Every file-system step of the second save is bracketed by a look at step 2 (what a kill there would leave).
    for module, name in ((shutil, "rmtree"), (os, "rename"), (os, "replace")):
        monkeypatch.setattr(module, name, checked(getattr(module, name)))
    _save(root, 2, 2.0, "stopped by SIGTERM")
    monkeypatch.undo()
    assert seen and None not in seen, seen
    assert seen[0] == {"reason": "periodic", "w": 1.0}
    assert _complete(root, 2) == {"reason": "stopped by SIGTERM", "w": 2.0}
    assert [p.name for p in root.iterdir()] == ["step_00000002"]  # no temp or old directory left


@pytest.mark.parametrize("addresses", [[".."], ["/data/x/.."], 5, [], [None], ["a\x00b"]])
def test_mindrecord_shard_addresses_stay_beside_the_file(tmp_path, addresses):
    from petformers.data.mindrecord import dataset_files
    from petformers.errors import DataError

    header = json.dumps({"schema": {}, "header_size": 1 << 24, "page_size": 1 << 25,
                         "shard_addresses": addresses}).encode()
    path = tmp_path / "data" / "train.mindrecord"
    path.parent.mkdir()
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(DataError) as e:
        dataset_files(path)
    assert str(path) in str(e.value) and "shard_addresses" in str(e.value) and "\n" not in str(e.value)
