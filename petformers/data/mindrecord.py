"""MindRecord datasets (`name.mindrecord` + `name.mindrecord.db`), read natively without MindSpore.

Layout (MindSpore's minddata/mindrecord, format version 3.0), as this reader relies on it:
- The data file starts with a little-endian uint64 length and that many bytes of header JSON:
  `schema` (field -> type and shape), `blob_fields`, `header_size`, `page_size`, `version` and
  `shard_addresses` (every file of the dataset, in shard order). Page p starts at
  header_size + p * page_size.
- The `.db` file is SQLite: table INDEXES gives, per ROW_ID, the page and byte range of its raw
  (msgpack) record and of its blob; SHARD_NAME holds the data file's name.
- A row's blob and raw record each start with a little-endian uint64 length. With several blob
  fields, each field is a big-endian uint64 length and its bytes; with one, the blob is the field.
- From version 3.0, int32/int64 blob fields are compressed (ShardColumn::CompressInt): a big-endian
  uint32 element count, a bitmap of 2 bits per element (most significant bits first) giving its
  stored width (0: int8, 1: int16, 2: int32, 3: int64), then each element signed little-endian in
  that width. Other blob fields are raw little-endian arrays (or bytes).
`MindDataset(shuffle=False)` yields the files in `shard_addresses` order, each file's rows by ROW_ID.
"""

from __future__ import annotations

import json
import mmap
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch.utils.data

from petformers.data.packing import IGNORE_INDEX
from petformers.errors import DataError
from petformers.safepath import inside

_NUMPY = {"int32": "<i4", "int64": "<i8", "float32": "<f4", "float64": "<f8"}
_COLUMNS = ("ROW_ID, PAGE_ID_RAW, PAGE_OFFSET_RAW, PAGE_OFFSET_RAW_END, "
            "PAGE_ID_BLOB, PAGE_OFFSET_BLOB, PAGE_OFFSET_BLOB_END")


def read_header(path: Path) -> dict:
    """The header JSON of one MindRecord data file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise DataError(f"{path}: truncated MindRecord file ({len(head)} bytes, no header)")
            length = int.from_bytes(head, "little")
            if length > 1 << 30:
                raise DataError(f"{path}: not a MindRecord file (header length {length})")
            raw = fh.read(length)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    if len(raw) < length:
        raise DataError(f"{path}: truncated MindRecord header ({len(raw)} of {length} bytes)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"{path}: not a MindRecord file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise DataError(f"{path}: MindRecord header: expected a JSON object, got {type(header).__name__}")
    for key in ("schema", "header_size", "page_size", "shard_addresses"):
        if key not in header:
            raise DataError(f"{path}: MindRecord header has no {key!r}")
    for key in ("header_size", "page_size"):
        if not isinstance(header[key], int) or isinstance(header[key], bool) or header[key] < 0:
            raise DataError(f"{path}: MindRecord header key {key!r}: expected a byte count, got {header[key]!r:.80}")
    return header


def dataset_files(path) -> list[Path]:
    """All data files of the dataset `path` belongs to, in shard order (as the header lists them).

    `path` may be any one shard file, or a directory: then every MindRecord dataset in it, each
    in shard order, datasets sorted by their first file name.
    """
    path = Path(path)
    if path.is_dir():
        candidates = sorted(p for p in path.iterdir() if p.is_file() and ".mindrecord" in p.name
                            and not p.name.endswith(".db"))
        if not candidates:
            raise DataError(f"{path}: no .mindrecord files in this directory")
        files: list[Path] = []
        for candidate in candidates:
            if candidate not in files:
                files.extend(f for f in dataset_files(candidate) if f not in files)
        return files
    if not path.exists():
        raise DataError(f"{path}: no such MindRecord file")
    header = read_header(path)
    addresses = header["shard_addresses"]
    if not isinstance(addresses, list) or not addresses:
        raise DataError(f"{path}: MindRecord header: shard_addresses: expected a list of file names, got {addresses!r:.80}")
    # Shards are looked up beside this file by their base name (MindSpore writes absolute paths of the
    # machine that wrote them); a name that is not a plain file name there is refused.
    files = [inside(path.parent, Path(a).name if isinstance(a, str) else a, path, "shard_addresses", DataError)
             for a in addresses]
    for f in files:
        if f.name in ("", ".", ".."):
            raise DataError(f"{path}: MindRecord header: shard_addresses: {f.name!r} is not a file name")
    for f in files:
        if not f.exists():
            raise DataError(f"{path}: its header lists shard {f.name}, which is missing from {path.parent}")
    return files


@dataclass
class _Shard:
    """One data file: its memory map, header facts and row index (from the .db)."""

    path: Path
    buf: mmap.mmap
    schema: dict
    blob_fields: list[str]
    compressed: bool
    header_size: int
    page_size: int
    index: np.ndarray  # [rows, 7] int64: ROW_ID, raw page/start/end, blob page/start/end

    @classmethod
    def open(cls, path: Path) -> "_Shard":
        header = read_header(path)
        schemas = header["schema"]
        if not isinstance(schemas, list) or not all(isinstance(s, dict) for s in schemas) or any(
                not isinstance(s.get("schema"), dict) or not all(isinstance(v, dict) for v in s["schema"].values())
                or not isinstance(s.get("blob_fields") or [], list) for s in schemas):
            raise DataError(f"{path}: MindRecord header key 'schema': expected a list of {{'schema': {{field: "
                            f"{{'type': ...}}}}, 'blob_fields': [...]}}, got {schemas!r:.80}")
        if not schemas:
            raise DataError(f"{path}: MindRecord header has an empty schema list")
        schema, blob_fields = schemas[0]["schema"], list(schemas[0].get("blob_fields") or [])
        version = str(header.get("version", "3.0"))
        has_int_array = any(v.get("type") in ("int32", "int64") and "shape" in v for v in schema.values())
        compressed = _version(version) >= (3, 0) and has_int_array
        index = _read_index(path)
        header_size, page_size = int(header["header_size"]), int(header["page_size"])
        with open(path, "rb") as fh:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        if len(index):
            ends = np.maximum(header_size + index[:, 1] * page_size + index[:, 3],
                              header_size + index[:, 4] * page_size + index[:, 6])
            worst = int(ends.argmax())
            if int(ends[worst]) > len(buf):
                raise DataError(f"{path}: truncated: row {int(index[worst, 0])} needs {int(ends[worst])} bytes, "
                                f"the file has {len(buf)}")
        return cls(path, buf, schema, blob_fields, compressed, header_size, page_size, index)

    def _record(self, page: int, start: int, end: int, row: int, what: str) -> memoryview:
        offset = self.header_size + page * self.page_size
        data = memoryview(self.buf)[offset + start:offset + end]
        if len(data) < 8 or int.from_bytes(data[:8], "little") != len(data) - 8:
            raise DataError(f"{self.path}: row {row}: corrupt {what} record (length prefix does not match the "
                            f".db index)")
        return data[8:]

    def row(self, i: int) -> dict:
        row_id, raw_page, raw_start, raw_end, blob_page, blob_start, blob_end = (int(v) for v in self.index[i])
        out: dict = {}
        raw_fields = [f for f in self.schema if f not in self.blob_fields]
        if raw_fields:
            import msgpack  # only MindRecord's raw (non-blob) fields need it

            raw = self._record(raw_page, raw_start, raw_end, row_id, "raw")
            try:
                values = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=False)
            except Exception:
                raise DataError(f"{self.path}: row {row_id}: raw record is not valid msgpack") from None
            for field in raw_fields:
                if field not in values:
                    raise DataError(f"{self.path}: row {row_id}: field {field!r} missing from its raw record")
                kind = self.schema[field].get("type")
                out[field] = np.array(values[field], dtype=_NUMPY[kind])[()] if kind in _NUMPY else values[field]
        if self.blob_fields:
            blob = self._record(blob_page, blob_start, blob_end, row_id, "blob")
            for field, data in zip(self.blob_fields, _split_blob(blob, len(self.blob_fields), self.path, row_id)):
                out[field] = self._decode(field, data, row_id)
        return {f: out[f] for f in self.schema if f in out}

    def _decode(self, field: str, data: memoryview, row_id: int):
        spec = self.schema.get(field, {})
        kind = spec.get("type")
        if kind == "bytes":
            return bytes(data)
        if kind == "string":
            return bytes(data).decode("utf-8")
        if kind not in _NUMPY:
            raise DataError(f"{self.path}: field {field!r} has unsupported type {kind!r}")
        if self.compressed and kind in ("int32", "int64"):
            array = _uncompress_int(data, self.path, row_id, field).astype(_NUMPY[kind])
        else:
            itemsize = np.dtype(_NUMPY[kind]).itemsize
            if len(data) % itemsize:
                raise DataError(f"{self.path}: row {row_id}: field {field!r} has {len(data)} bytes, "
                                f"not a multiple of {itemsize}")
            array = np.frombuffer(data, dtype=_NUMPY[kind]).copy()
        shape = spec.get("shape")
        if shape and len(shape) > 1:
            try:
                array = array.reshape(shape)
            except ValueError:
                raise DataError(f"{self.path}: row {row_id}: field {field!r} has {array.size} values, "
                                f"which do not fit shape {shape}") from None
        return array


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split("."))
    except ValueError:
        return (0,)


def _read_index(path: Path) -> np.ndarray:
    db = path.with_name(path.name + ".db")
    if not db.exists():
        raise DataError(f"{path}: its index file {db.name} is missing (a MindRecord needs both files)")
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
        try:
            names = con.execute("SELECT NAME FROM SHARD_NAME").fetchall()
            rows = con.execute(f"SELECT {_COLUMNS} FROM INDEXES ORDER BY ROW_ID").fetchall()
        finally:
            con.close()
    except sqlite3.Error as e:
        raise DataError(f"{db}: not a readable MindRecord index ({e}); is it truncated?") from None
    if names and names[0][0] != path.name:
        raise DataError(f"{db}: table SHARD_NAME, row 1: index of {names[0][0]!r}, not of {path.name!r}")
    return np.array(rows, dtype=np.int64).reshape(-1, 7)


def _split_blob(blob: memoryview, count: int, path: Path, row_id: int) -> list[memoryview]:
    if count == 1:
        return [blob]
    parts, pos = [], 0
    for _ in range(count):
        if pos + 8 > len(blob):
            raise DataError(f"{path}: row {row_id}: blob ends before all its fields")
        size = int.from_bytes(blob[pos:pos + 8], "big")
        pos += 8
        if pos + size > len(blob):
            raise DataError(f"{path}: row {row_id}: blob field of {size} bytes runs past the blob's end")
        parts.append(blob[pos:pos + size])
        pos += size
    return parts


def _uncompress_int(data: memoryview, path: Path, row_id: int, field: str) -> np.ndarray:
    """MindRecord's compressed integer array -> int64 values (vectorised)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if len(raw) < 4:
        raise DataError(f"{path}: row {row_id}: field {field!r} is too short for a compressed int array")
    n = int.from_bytes(bytes(raw[:4]), "big")
    bitmap_len = (n + 3) // 4
    bitmap = raw[4:4 + bitmap_len]
    codes = ((bitmap[:, None] >> np.array([6, 4, 2, 0], dtype=np.uint8)) & 3).reshape(-1)[:n]
    widths = np.left_shift(1, codes.astype(np.int64))
    starts = 4 + bitmap_len + np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int64)
    if len(bitmap) < bitmap_len or (n and starts[-1] + widths[-1] > len(raw)):
        raise DataError(f"{path}: row {row_id}: field {field!r}: compressed int array is truncated")
    out = np.empty(n, dtype=np.int64)
    for code, kind in enumerate(("<i1", "<i2", "<i4", "<i8")):
        where = np.nonzero(codes == code)[0]
        if len(where):
            width = 1 << code
            gathered = raw[starts[where, None] + np.arange(width)]
            out[where] = np.ascontiguousarray(gathered).view(kind).reshape(-1)
    return out


def iter_mindrecord(path) -> Iterator[dict]:
    """Rows of the dataset, as MindDataset(shuffle=False) yields them: field -> numpy array or scalar."""
    for f in dataset_files(path):
        shard = _Shard.open(f)
        for i in range(len(shard.index)):
            yield shard.row(i)


def read_mindrecord(path) -> list[dict]:
    """All rows of the dataset `path` (one shard file, or a directory), in MindDataset(shuffle=False) order."""
    return list(iter_mindrecord(path))


class MindRecordDataset(torch.utils.data.Dataset):
    """A MindFormers llama_preprocess MindRecord (`input_ids`, `labels`: seq_length+1 each) as training rows.

    Row i (a torch-style map dataset) is the trainer's canonical row: int32 numpy arrays
    `input_ids` = input_ids[:-1], `targets` = labels[1:] with -100 also where the input token is
    `pad_id` (MindFormers' LlamaForCausalLM masks those), `position_ids` = arange(seq_length),
    `segment_ids` = zeros(seq_length). A dataset without `labels` (pretraining) trains on input_ids.
    Rows are decoded on access from memory-mapped files.
    """

    packing = False

    def __init__(self, path, pad_id: int):
        self.path = Path(path)
        self.pad_id = int(pad_id)
        self._shards = [_Shard.open(f) for f in dataset_files(self.path)]
        self._where = [(s, i) for s, shard in enumerate(self._shards) for i in range(len(shard.index))]
        if not self._where:
            raise DataError(f"{self.path}: the MindRecord dataset has no rows")
        if "input_ids" not in self._shards[0].schema:
            raise DataError(f"{self.path}: MindRecord schema has no 'input_ids' field "
                            f"(fields: {', '.join(self._shards[0].schema)})")
        first = self._row(0)
        self.seq_length = len(first["input_ids"]) - 1
        if self.seq_length < 1:
            raise DataError(f"{self.path}: row 0 has {self.seq_length + 1} tokens; rows need at least 2")
        self.meta = {"seq_length": self.seq_length, "rows": len(self._where), "source": str(self.path),
                     "format": "mindrecord"}

    def __len__(self) -> int:
        return len(self._where)

    def _row(self, index: int) -> dict:
        s, i = self._where[index]
        return self._shards[s].row(i)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        row = self._row(index)
        ids = np.asarray(row["input_ids"], dtype=np.int32).reshape(-1)
        labels = np.asarray(row.get("labels", ids), dtype=np.int32).reshape(-1)
        if len(ids) != self.seq_length + 1 or len(labels) != len(ids):
            raise DataError(f"{self._shards[self._where[index][0]].path}: row {index} has {len(ids)} input_ids and "
                            f"{len(labels)} labels; every row must have seq_length+1 = {self.seq_length + 1}")
        inputs = ids[:-1].copy()
        targets = labels[1:].copy()
        targets[inputs == self.pad_id] = IGNORE_INDEX
        return {
            "input_ids": inputs,
            "targets": targets,
            "position_ids": np.arange(self.seq_length, dtype=np.int32),
            "segment_ids": np.zeros(self.seq_length, dtype=np.int32),
        }
