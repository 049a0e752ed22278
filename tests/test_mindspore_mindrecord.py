"""MindRecord datasets written by real MindSpore (FileWriter) read natively: the recorded rows in
MindDataset(shuffle=False) order, the trainer's row format, and clear errors for damaged files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import MINDSPORE_FIXTURES
from petformers.data.mindrecord import (MindRecordDataset, _uncompress_int, dataset_files, read_header,
                                        read_mindrecord)
from petformers.errors import DataError

pytestmark = pytest.mark.skipif(not MINDSPORE_FIXTURES.exists(), reason="MindSpore fixtures not present")

META = json.loads((MINDSPORE_FIXTURES / "alpaca_tiny.json").read_text()) if MINDSPORE_FIXTURES.exists() else {}
SINGLE = MINDSPORE_FIXTURES / "alpaca_tiny.mindrecord"
SHARD0 = MINDSPORE_FIXTURES / "alpaca_tiny_2shards.mindrecord0"


def _cases():
    return [(ds, f) for ds, files in META.get("datasets", {}).items() for f in files]


@pytest.mark.parametrize("dataset,file", _cases())
def test_recorded_rows_in_minddataset_order(dataset, file):
    rows = read_mindrecord(MINDSPORE_FIXTURES / file)  # any shard file opens the whole dataset
    order = META["minddataset_order_shuffle_false"][dataset]
    assert len(rows) == len(order) == META["num_rows"]
    for got, i in zip(rows, order):
        assert list(got) == ["input_ids", "labels"]
        for field in ("input_ids", "labels"):
            assert got[field].dtype == np.int32 and got[field].shape == (META["row_length"],)
            assert got[field].tolist() == META["rows"][i][field]


def test_shards_and_header():
    assert dataset_files(MINDSPORE_FIXTURES / "alpaca_tiny_2shards.mindrecord1") == [
        MINDSPORE_FIXTURES / f for f in META["datasets"]["alpaca_tiny_2shards"]]
    header = read_header(SINGLE)
    assert header["header_size"] == META["header_size"] and header["page_size"] == META["page_size"]
    assert header["schema"][0]["schema"] == META["schema"]
    # A directory holds both datasets: each in shard order, datasets by name.
    assert len(read_mindrecord(MINDSPORE_FIXTURES)) == 40


def test_dataset_gives_the_trainers_rows():
    ds = MindRecordDataset(SHARD0, pad_id=20)
    assert len(ds) == 20 and ds.packing is False
    assert ds.meta == {"seq_length": 32, "rows": 20, "source": str(SHARD0), "format": "mindrecord"}
    order = META["minddataset_order_shuffle_false"]["alpaca_tiny_2shards"]
    for k, i in enumerate(order):
        ids, labels = np.array(META["rows"][i]["input_ids"]), np.array(META["rows"][i]["labels"])
        row = ds[k]
        assert set(row) == {"input_ids", "targets", "position_ids", "segment_ids"}
        assert all(v.dtype == np.int32 and v.shape == (32,) for v in row.values())
        assert row["input_ids"].tolist() == ids[:-1].tolist()
        want = labels[1:].copy()
        want[ids[:-1] == 20] = -100  # MindFormers masks the loss where the input token is the pad id
        assert row["targets"].tolist() == want.tolist()
        assert row["position_ids"].tolist() == list(range(32)) and not row["segment_ids"].any()
    masked = [k for k, i in enumerate(order) if 20 in META["rows"][i]["input_ids"][10:-1]]
    assert masked  # the pad rule is exercised on trained positions


def test_dataloader_batches():
    loader = torch.utils.data.DataLoader(MindRecordDataset(SINGLE, pad_id=0), batch_size=8)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (8, 32) and batch["input_ids"].dtype == torch.int32


def _compress(values: list[int]) -> bytes:
    """MindRecord's CompressInt, written from its description: count, 2-bit widths, little-endian values."""
    widths = [next(c for c in range(4) if -(1 << (8 * (1 << c) - 1)) <= v < 1 << (8 * (1 << c) - 1)) for v in values]
    bitmap = bytearray((len(values) + 3) // 4)
    for i, c in enumerate(widths):
        bitmap[i // 4] |= c << (2 * (3 - i % 4))
    body = b"".join(v.to_bytes(1 << c, "little", signed=True) for v, c in zip(values, widths))
    return len(values).to_bytes(4, "big") + bytes(bitmap) + body


def test_compressed_ints_of_every_width():
    values = [0, -1, 127, -128, 128, -129, 32767, -32768, 32768, -(1 << 31), (1 << 31) - 1, 1 << 31,
              -(1 << 63), (1 << 63) - 1, 5]
    got = _uncompress_int(memoryview(_compress(values)), SINGLE, 0, "x")
    assert got.dtype == np.int64 and got.tolist() == values
    assert _uncompress_int(memoryview(_compress([])), SINGLE, 0, "x").tolist() == []
    with pytest.raises(DataError, match="compressed int array is truncated"):
        _uncompress_int(memoryview(_compress(values)[:-3]), SINGLE, 0, "x")


# ---- bad input --------------------------------------------------------------------------------

def _copy(tmp_path, names):
    for name in names:
        for suffix in ("", ".db"):
            shutil.copy(MINDSPORE_FIXTURES / (name + suffix), tmp_path / (name + suffix))


def test_truncated_data_file(tmp_path):
    _copy(tmp_path, ["alpaca_tiny.mindrecord"])
    path = tmp_path / "alpaca_tiny.mindrecord"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(DataError, match=r"alpaca_tiny.mindrecord: truncated: row \d+ needs \d+ bytes, the file has"):
        read_mindrecord(path)
    path.write_bytes(data[:100])
    with pytest.raises(DataError, match=r"alpaca_tiny.mindrecord: truncated MindRecord header"):
        read_mindrecord(path)


def test_corrupt_record_length(tmp_path):
    _copy(tmp_path, ["alpaca_tiny.mindrecord"])
    path = tmp_path / "alpaca_tiny.mindrecord"
    data = bytearray(path.read_bytes())
    data[META["header_size"]] ^= 0x01  # the first row's blob length prefix
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"row 0: corrupt blob record"):
        read_mindrecord(path)


def test_index_file_missing_or_truncated(tmp_path):
    _copy(tmp_path, ["alpaca_tiny.mindrecord"])
    db = tmp_path / "alpaca_tiny.mindrecord.db"
    db.write_bytes(db.read_bytes()[:3000])
    with pytest.raises(DataError, match=r"alpaca_tiny.mindrecord.db: not a readable MindRecord index"):
        read_mindrecord(tmp_path / "alpaca_tiny.mindrecord")
    db.unlink()
    with pytest.raises(DataError, match=r"index file alpaca_tiny.mindrecord.db is missing"):
        read_mindrecord(tmp_path / "alpaca_tiny.mindrecord")


def test_missing_shard_and_foreign_files(tmp_path):
    _copy(tmp_path, ["alpaca_tiny_2shards.mindrecord0"])
    with pytest.raises(DataError, match=r"lists shard alpaca_tiny_2shards.mindrecord1, which is missing"):
        MindRecordDataset(tmp_path / "alpaca_tiny_2shards.mindrecord0", pad_id=0)
    (tmp_path / "x.mindrecord").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
    with pytest.raises(DataError, match=r"x.mindrecord: not a MindRecord file"):
        read_mindrecord(tmp_path / "x.mindrecord")
    with pytest.raises(DataError, match=r"nothing.mindrecord: no such MindRecord file"):
        read_mindrecord(tmp_path / "nothing.mindrecord")


def test_raw_msgpack_fields_decode():
    # MindSpore writes a placeholder raw record {"id": 0} per row when every field is a blob; read it
    # as if the schema had a scalar field `id`, to exercise the msgpack path on MindSpore's own bytes.
    from petformers.data.mindrecord import _Shard

    shard = _Shard.open(SINGLE)
    shard.schema = {"id": {"type": "int64"}} | shard.schema
    row = shard.row(3)
    assert list(row) == ["id", "input_ids", "labels"]
    assert row["id"] == 0 and row["id"].dtype == np.int64
    assert row["input_ids"].tolist() == META["rows"][3]["input_ids"]
