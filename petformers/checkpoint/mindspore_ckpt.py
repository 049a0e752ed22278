"""MindSpore `.ckpt` files, read and written natively: no `mindspore`, no protobuf compiler.

The format (MindSpore's `checkpoint.proto`, proto2) is a stream of serialized `Checkpoint` messages,
which protobuf reads as one message with a repeated `value` field:

    message Checkpoint {
      message Value { required string tag = 1; oneof value { TensorProto tensor = 2;
                                                             MapTensorProto maptensor = 3; } }
      repeated Value value = 1;
    }
    message TensorProto { repeated int64 dims = 1; required string tensor_type = 2;
                          required bytes tensor_content = 3; }

Facts from `mindspore/train/serialization.py` that this module relies on:
- `save_checkpoint` writes each parameter as its own `Checkpoint` message; a tensor over 512 MiB is
  written as several consecutive values with the same tag and the full dims, whose contents
  concatenate (little-endian, C order).
- `append_dict` entries: numbers become 0-d tensors (int -> Int64, float -> Float32); strings have
  tensor_type `str`, dims [0] and numpy's UTF-32-LE bytes.
- `crc_check=True` appends b"crc_num" + crc32(all preceding bytes) as 10 big-endian bytes.
- Encrypted files (`enc_key`) start with a cipher magic number instead of a protobuf field.

Tensors are returned as torch tensors viewing a copy-on-write memory map of the file (numpy has no
bfloat16); only tensors split over several values are copied.
"""

from __future__ import annotations

import math
import mmap
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from petformers.atomic import atomic_open
from petformers.errors import CheckpointError

# MindSpore tensor_type -> (numpy dtype of the raw bytes, torch dtype).
_TYPES = {
    "Bool": (np.bool_, torch.bool),
    "Int8": (np.int8, torch.int8),
    "UInt8": (np.uint8, torch.uint8),
    "Int16": (np.int16, torch.int16),
    "UInt16": (np.uint16, torch.uint16),
    "Int32": (np.int32, torch.int32),
    "UInt32": (np.uint32, torch.uint32),
    "Int64": (np.int64, torch.int64),
    "UInt64": (np.uint64, torch.uint64),
    "Float16": (np.float16, torch.float16),
    "Float32": (np.float32, torch.float32),
    "Float64": (np.float64, torch.float64),
    "BFloat16": (np.uint16, torch.bfloat16),  # raw bits; viewed as bfloat16 in torch
}
_TORCH_TO_TYPE = {torch_dtype: name for name, (_, torch_dtype) in _TYPES.items()}
_CIPHER_MAGIC = {0x7F3A5ED8: "AES-GCM", 0x7F3A5ED9: "AES-CBC", 0x7F3A5EDA: "SM4-CBC"}
_CRC_TAG = b"crc_num"
_CRC_TRAILER = len(_CRC_TAG) + 10
SLICE_BYTES = 512 * 1024 * 1024  # MindSpore's SLICE_SIZE: larger tensors are split over several values


# ---- reading ----------------------------------------------------------------------------------

def _varint(buf, pos: int, end: int, path, what: str) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= end:
            raise CheckpointError(f"{path}: truncated at byte {pos} (inside {what}); the file is incomplete")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise CheckpointError(f"{path}: corrupt varint at byte {pos} (inside {what})")


def _fields(buf, start: int, end: int, path, what: str):
    """(field number, wire type, value) over one message; length-delimited values are (start, end)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end, path, what)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end, path, what)
        elif wire == 2:
            length, pos = _varint(buf, pos, end, path, what)
            if pos + length > end:
                raise CheckpointError(f"{path}: truncated at byte {end} ({what} needs {pos + length - end} "
                                      "more bytes); the file is incomplete")
            value = (pos, pos + length)
            pos += length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise CheckpointError(f"{path}: truncated at byte {end} (inside {what}); the file is incomplete")
            value = bytes(buf[pos:pos + size])
            pos += size
        else:
            raise CheckpointError(f"{path}: not a valid protobuf stream at byte {pos} (inside {what}, "
                                  f"wire type {wire}); the file is corrupt")
        yield field, wire, value


def _check_magic(buf, path):
    if len(buf) == 0:
        raise CheckpointError(f"{path}: empty file, not a MindSpore checkpoint")
    if len(buf) >= 4:
        magic = int.from_bytes(buf[:4], "little")
        if magic in _CIPHER_MAGIC:
            raise CheckpointError(f"{path}: encrypted MindSpore checkpoint ({_CIPHER_MAGIC[magic]}); decrypt it with "
                                  "mindspore.load_checkpoint(..., dec_key=...) and save it again without enc_key")
    if buf[0] != 0x0A:  # field 1 (Checkpoint.value), length-delimited
        raise CheckpointError(f"{path}: not a MindSpore checkpoint (no protobuf Checkpoint.value at byte 0; "
                              "encrypted or foreign files look like this)")


def _verify_crc(buf, end: int, path):
    expected = int.from_bytes(buf[end + len(_CRC_TAG):end + _CRC_TRAILER], "big")
    crc, view, step = 0, memoryview(buf), 64 * 1024 * 1024
    for start in range(0, end, step):
        crc = zlib.crc32(view[start:min(end, start + step)], crc)
    view.release()
    if crc != expected:
        raise CheckpointError(f"{path}: CRC check failed (file says {expected:#010x}, content gives {crc:#010x}); "
                              "the file is damaged")


def _scan(buf, end: int, path) -> list[tuple[str, str, tuple[int, ...], int, int]]:
    """(tag, tensor_type, dims, content start, content end) for every value, in file order."""
    entries = []
    for field, wire, value in _fields(buf, 0, end, path, "Checkpoint"):
        if field != 1 or wire != 2:
            continue  # an unknown field: skip it, as protobuf does
        tag, tensor = None, None
        for f, w, v in _fields(buf, value[0], value[1], path, "Checkpoint.Value"):
            if f == 1 and w == 2:
                tag = bytes(buf[v[0]:v[1]]).decode("utf-8", errors="replace")
            elif f == 2 and w == 2:
                tensor = v
            elif f == 3:
                raise CheckpointError(f"{path}: value {tag or '?'!r} is a MapParameter (maptensor), "
                                      "which petformers does not read")
        if tag is None or tensor is None:
            raise CheckpointError(f"{path}: a Checkpoint.Value at byte {value[0]} has no tag or no tensor; "
                                  "the file is corrupt")
        dims, tensor_type, content = [], None, (tensor[1], tensor[1])
        for f, w, v in _fields(buf, tensor[0], tensor[1], path, f"tensor {tag!r}"):
            if f == 1 and w == 0:
                dims.append(v)
            elif f == 1 and w == 2:  # packed dims
                pos = v[0]
                while pos < v[1]:
                    d, pos = _varint(buf, pos, v[1], path, f"dims of {tag!r}")
                    dims.append(d)
            elif f == 2 and w == 2:
                tensor_type = bytes(buf[v[0]:v[1]]).decode("utf-8", errors="replace")
            elif f == 3 and w == 2:
                content = v
        if tensor_type is None:
            raise CheckpointError(f"{path}: tensor {tag!r} has no tensor_type; the file is corrupt")
        if any(d >= 1 << 63 for d in dims):
            raise CheckpointError(f"{path}: tensor {tag!r} has a negative dimension {dims}; the file is corrupt")
        entries.append((tag, tensor_type, tuple(dims), content[0], content[1]))
    return entries


def _as_tensor(buf, path, tag: str, tensor_type: str, dims: tuple, chunks: list[tuple[int, int]]):
    if tensor_type == "str":
        raw = b"".join(bytes(buf[s:e]) for s, e in chunks)
        return raw.decode("utf-32-le", errors="replace").rstrip("\x00")
    if tensor_type not in _TYPES:
        known = ", ".join(sorted(_TYPES) + ["str"])
        raise CheckpointError(f"{path}: tensor {tag!r} has unknown tensor_type {tensor_type!r} (known: {known})")
    np_dtype, torch_dtype = _TYPES[tensor_type]
    itemsize = np.dtype(np_dtype).itemsize
    nbytes = sum(e - s for s, e in chunks)
    if dims == (0,) and nbytes == itemsize:
        dims = ()  # MindSpore reads dims [0] as a scalar
    count = math.prod(dims)
    if nbytes != count * itemsize:
        raise CheckpointError(f"{path}: tensor {tag!r} ({tensor_type}, shape {list(dims)}) should hold "
                              f"{count * itemsize} bytes but holds {nbytes}; the file is corrupt")
    if len(chunks) == 1:
        array = np.frombuffer(buf, dtype=np_dtype, count=count, offset=chunks[0][0])
    else:  # a tensor split over several values: the one case that copies
        array = np.empty(count, dtype=np_dtype)
        raw, pos = array.view(np.uint8), 0
        for s, e in chunks:
            raw[pos:pos + e - s] = np.frombuffer(buf, dtype=np.uint8, count=e - s, offset=s)
            pos += e - s
    tensor = torch.from_numpy(array.reshape(dims))
    return tensor.view(torch_dtype) if torch_dtype == torch.bfloat16 else tensor


def read_ckpt(path, verify_crc: bool = True) -> dict[str, torch.Tensor | str]:
    """Every entry of a MindSpore checkpoint, in file order.

    Tensors keep their dtype (bfloat16 included) and view a copy-on-write memory map of the file, so
    nothing is read until used and writing to them never touches the file. 0-d tensors are the
    scalars of `append_dict` (epoch_num, step_num, loss_scale, ...); `str` entries are Python str.
    A `crc_num` trailer, when present, is verified unless `verify_crc=False`.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise CheckpointError(f"{path}: empty file, not a MindSpore checkpoint")
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    _check_magic(buf, path)
    end = size
    if size >= _CRC_TRAILER and buf[size - _CRC_TRAILER:size - 10] == _CRC_TAG:
        end = size - _CRC_TRAILER
        if verify_crc:
            _verify_crc(buf, end, path)
    out: dict[str, torch.Tensor | str] = {}
    entries = _scan(buf, end, path)
    i = 0
    while i < len(entries):
        tag, tensor_type, dims, s, e = entries[i]
        chunks = [(s, e)]
        while i + 1 < len(entries) and entries[i + 1][0] == tag:  # slices of one large tensor
            i += 1
            chunks.append(entries[i][3:5])
        out[tag] = _as_tensor(buf, path, tag, tensor_type, dims, chunks)
        i += 1
    return out


# ---- writing ----------------------------------------------------------------------------------

def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(field: int, payload_len: int) -> bytes:
    return _encode_varint(field << 3 | 2) + _encode_varint(payload_len)


def _message_head(tag: str, dims, tensor_type: str, content_len: int) -> bytes:
    """One `Checkpoint` message up to (not including) its tensor_content bytes."""
    tag_bytes, type_bytes = tag.encode("utf-8"), tensor_type.encode("utf-8")
    tensor = b"".join(b"\x08" + _encode_varint(int(d)) for d in dims)
    tensor += _len_field(2, len(type_bytes)) + type_bytes + _len_field(3, content_len)
    tensor_len = len(tensor) + content_len
    value = _len_field(1, len(tag_bytes)) + tag_bytes + _len_field(2, tensor_len)
    return _len_field(1, len(value) + tensor_len) + value + tensor


def _encode_entry(name: str, value) -> tuple[list[int], str, memoryview]:
    """(dims, tensor_type, little-endian bytes) as MindSpore's save_checkpoint would store `value`."""
    if isinstance(value, str):
        return [0], "str", memoryview(np.array(value).astype("<U").tobytes())
    if isinstance(value, (bool, np.bool_)):
        value = torch.tensor(bool(value))
    elif isinstance(value, (int, np.integer)):
        value = torch.tensor(int(value), dtype=torch.int64)
    elif isinstance(value, (float, np.floating)):
        value = torch.tensor(float(value), dtype=torch.float32)
    if isinstance(value, np.ndarray):
        if value.dtype.byteorder == ">":
            value = value.astype(value.dtype.newbyteorder("<"))
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"write_ckpt: {name!r} is a {type(value).__name__}; expected a tensor, array, "
                              "number or str")
    if value.dtype not in _TORCH_TO_TYPE:
        raise CheckpointError(f"write_ckpt: {name!r} has dtype {value.dtype}, which MindSpore checkpoints "
                              "cannot hold")
    t = value.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
    return list(t.shape), _TORCH_TO_TYPE[t.dtype], memoryview(raw)


def write_ckpt(path, tensors: dict, crc: bool = False) -> Path:
    """Write `tensors` (name -> torch.Tensor, np.ndarray, number or str) as a checkpoint MindSpore loads.

    The encoding is MindSpore's own (one message per value, 512 MiB slices, `str` entries as
    `append_dict` writes them, optional `crc_num` trailer), so re-writing what `read_ckpt` returned
    gives the original bytes. Written to a temporary file and renamed: never half-written.
    """
    path = Path(path)
    running = 0
    with atomic_open(path, "wb") as fh:
        for name, value in tensors.items():
            dims, tensor_type, raw = _encode_entry(name, value)
            starts = range(0, len(raw), SLICE_BYTES) if len(raw) else [0]
            for start in starts:
                chunk = raw[start:start + SLICE_BYTES]
                head = _message_head(name, dims, tensor_type, len(chunk))
                fh.write(head)
                fh.write(chunk)
                if crc:
                    running = zlib.crc32(chunk, zlib.crc32(head, running))
        if crc:
            fh.write(_CRC_TAG + running.to_bytes(10, "big"))
    return path
