"""MindSpore .ckpt format: every fixture tensor (written by real MindSpore 2.10) reads back exactly,
re-writing gives MindSpore's own bytes, and damaged files give one clear error each."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from petformers.checkpoint import mindspore_ckpt
from petformers.checkpoint.mindspore_ckpt import read_ckpt, write_ckpt
from petformers.errors import CheckpointError
from conftest import MINDSPORE_FIXTURES

META = json.loads((MINDSPORE_FIXTURES / "tiny_llama.json").read_text()) if MINDSPORE_FIXTURES.exists() else {}
FILES = ["tiny_llama.ckpt", "tiny_llama_bf16.ckpt", "tiny_llama_lora.ckpt", "tiny_extras_crc.ckpt"]
TORCH_DTYPES = {"Float32": torch.float32, "BFloat16": torch.bfloat16, "Float16": torch.float16,
                "Int32": torch.int32, "Int64": torch.int64}

pytestmark = pytest.mark.skipif(not MINDSPORE_FIXTURES.exists(), reason="MindSpore fixtures not present")


def _sha(value) -> str:
    if isinstance(value, str):
        return hashlib.sha256(value.encode("utf-32-le")).hexdigest()
    raw = value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


def _entries(file: str) -> list[dict]:
    info = META["files"][file]
    return info.get("params") or info["entries"]


@pytest.mark.parametrize("file", FILES)
def test_every_tensor_reads_with_recorded_shape_dtype_and_sha256(file):
    path = MINDSPORE_FIXTURES / file
    assert hashlib.sha256(path.read_bytes()).hexdigest() == META["files"][file]["file_sha256"]
    got = read_ckpt(path)
    assert list(got) == [e["name"] for e in _entries(file)]  # file order kept
    for e in _entries(file):
        value = got[e["name"]]
        assert _sha(value) == e["sha256"], e["name"]
        if e["ms_tensor_type"] == "str":
            assert isinstance(value, str)
            continue
        assert value.dtype == TORCH_DTYPES[e["ms_tensor_type"]], e["name"]
        assert list(value.shape) == e.get("shape", e.get("dims")), e["name"]
        if "first4" in e and value.dtype == torch.float32:
            assert value.reshape(-1)[:4].tolist() == pytest.approx(e["first4"], rel=0, abs=0)


def test_bfloat16_file_is_the_float32_weights_rounded_to_nearest_even():
    f32 = read_ckpt(MINDSPORE_FIXTURES / "tiny_llama.ckpt")
    bf16 = read_ckpt(MINDSPORE_FIXTURES / "tiny_llama_bf16.ckpt")
    for name, value in f32.items():
        assert torch.equal(bf16[name], value.to(torch.bfloat16)), name


def test_append_dict_scalars_and_str_entry():
    got = read_ckpt(MINDSPORE_FIXTURES / "tiny_extras_crc.ckpt")
    assert got["epoch_num"].dtype == torch.int64 and got["epoch_num"].shape == () and got["epoch_num"].item() == 3
    assert got["step_num"].item() == 42
    assert got["loss_scale"].dtype == torch.float32 and got["loss_scale"].item() == 1024.0
    assert got["note"] == "petformers fixture"
    assert got["some.int32_tensor"].reshape(-1)[:4].tolist() == [-3, -2, -1, 0]


@pytest.mark.parametrize("file", FILES)
def test_rewrite_gives_mindspores_own_bytes(file, tmp_path):
    original = MINDSPORE_FIXTURES / file
    out = write_ckpt(tmp_path / file, read_ckpt(original), crc=file == "tiny_extras_crc.ckpt")
    assert out.read_bytes() == original.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [file]  # no temporary file left behind


def test_tensors_view_a_copy_on_write_map_of_the_file(tmp_path):
    path = tmp_path / "x.ckpt"
    shutil.copy(MINDSPORE_FIXTURES / "tiny_llama.ckpt", path)
    before = path.read_bytes()
    weight = read_ckpt(path)["lm_head.weight"]
    original = weight.clone()
    weight.add_(1.0)  # writable, but private: the file never changes
    assert path.read_bytes() == before
    assert torch.equal(read_ckpt(path)["lm_head.weight"], original)


def test_large_tensors_split_over_values_concatenate(tmp_path, monkeypatch):
    monkeypatch.setattr(mindspore_ckpt, "SLICE_BYTES", 1000)  # MindSpore splits at 512 MiB
    g = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(33, 31, generator=g),  # 4092 bytes: 5 values, the last one short
        "big_bf16": torch.randn(40, 30, generator=g).to(torch.bfloat16),
        "small": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "flag": True, "step": 7, "scale": 0.5, "text": "中文 ✓",
    }
    path = write_ckpt(tmp_path / "split.ckpt", tensors, crc=True)
    assert path.read_bytes().count(b"\n\x03big\x12") == 5
    got = read_ckpt(path)
    assert list(got) == list(tensors)
    assert torch.equal(got["big"], tensors["big"]) and torch.equal(got["big_bf16"], tensors["big_bf16"])
    assert torch.equal(got["small"], tensors["small"])
    assert got["flag"].dtype == torch.bool and got["flag"].item() is True
    assert got["step"].dtype == torch.int64 and got["scale"].dtype == torch.float32
    assert got["text"] == "中文 ✓"


def test_numpy_arrays_are_written_too(tmp_path):
    import numpy as np

    array = np.arange(12, dtype=">f4").reshape(3, 4)  # big-endian in memory: stored little-endian
    got = read_ckpt(write_ckpt(tmp_path / "np.ckpt", {"a": array}))
    assert got["a"].dtype == torch.float32 and got["a"].tolist() == array.astype("<f4").tolist()


# ---- bad input: one clear error each ----------------------------------------------------------

def test_failed_crc(tmp_path):
    data = bytearray((MINDSPORE_FIXTURES / "tiny_extras_crc.ckpt").read_bytes())
    data[0x40] ^= 0x01  # a bit of model.norm_out.weight
    (tmp_path / "bad.ckpt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"bad\.ckpt: CRC check failed.*damaged"):
        read_ckpt(tmp_path / "bad.ckpt")
    assert read_ckpt(tmp_path / "bad.ckpt", verify_crc=False)["step_num"].item() == 42


@pytest.mark.parametrize("keep", [0.5, 0.001, 0.99])
def test_truncated_file(tmp_path, keep):
    data = (MINDSPORE_FIXTURES / "tiny_llama.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: truncated .*incomplete"):
        read_ckpt(tmp_path / "cut.ckpt")


def test_encrypted_file(tmp_path):
    # MindSpore's cipher blocks start with the magic number 0x7F3A5ED8 (AES-GCM), native int32.
    (tmp_path / "enc.ckpt").write_bytes((0x7F3A5ED8).to_bytes(4, "little") + bytes(range(200)))
    with pytest.raises(CheckpointError, match=r"enc\.ckpt: encrypted MindSpore checkpoint \(AES-GCM\)"):
        read_ckpt(tmp_path / "enc.ckpt")


def test_foreign_and_empty_files(tmp_path):
    (tmp_path / "zip.ckpt").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match=r"zip\.ckpt: not a MindSpore checkpoint"):
        read_ckpt(tmp_path / "zip.ckpt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.ckpt: empty file"):
        read_ckpt(tmp_path / "empty.ckpt")
    with pytest.raises(CheckpointError, match=r"missing\.ckpt: cannot be read"):
        read_ckpt(tmp_path / "missing.ckpt")


def test_unknown_tensor_type(tmp_path):
    data = write_ckpt(tmp_path / "a.ckpt", {"w": torch.ones(2, 2)}).read_bytes()
    (tmp_path / "a.ckpt").write_bytes(data.replace(b"Float32", b"Float99"))
    with pytest.raises(CheckpointError, match=r"tensor 'w' has unknown tensor_type 'Float99'"):
        read_ckpt(tmp_path / "a.ckpt")


def test_content_size_must_fit_dims(tmp_path):
    data = write_ckpt(tmp_path / "a.ckpt", {"w": torch.ones(2, 2)}).read_bytes()
    # dims [2, 2] -> [2, 3]: the 16 bytes no longer fit
    (tmp_path / "a.ckpt").write_bytes(data.replace(b"\x08\x02\x08\x02", b"\x08\x02\x08\x03"))
    with pytest.raises(CheckpointError,
                       match=r"tensor 'w' \(Float32, shape \[2, 3\]\) should hold 24 bytes but holds 16"):
        read_ckpt(tmp_path / "a.ckpt")


def test_unwritable_values(tmp_path):
    with pytest.raises(CheckpointError, match=r"'x' is a list"):
        write_ckpt(tmp_path / "a.ckpt", {"x": [1, 2]})
    with pytest.raises(CheckpointError, match=r"'c' has dtype torch.complex64"):
        write_ckpt(tmp_path / "a.ckpt", {"c": torch.zeros(2, dtype=torch.complex64)})
    assert not list(tmp_path.iterdir())
