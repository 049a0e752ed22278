"""Where a GGUF header goes wrong: the `gguf` package reports a damaged file as an IndexError or a
numpy reshape error with no position, so a file it cannot read is walked here (magic, version, counts,
every metadata key and tensor record) to name the item and byte where it stops making sense."""

from __future__ import annotations

import struct

# GGUF value types -> bytes (8 is a string, 9 an array)
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class _Stop(Exception):
    pass


def locate_problem(data: bytes) -> str:
    """'<item> at byte N: <what>' for the first inconsistency in the header of `data`, else where the
    header ends (the problem is then in the tensor data)."""
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise _Stop(f"{what} at byte {pos}: needs {n} bytes, the file ends at {len(data)}")
        pos += n
        return data[pos - n:pos]

    def u32(what): return struct.unpack("<I", take(4, what))[0]  # noqa: E704
    def u64(what): return struct.unpack("<Q", take(8, what))[0]  # noqa: E704

    def string(what: str) -> str:
        start = pos
        raw = take(u64(what + " length"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Stop(f"{what} at byte {start}: not UTF-8 (byte {start + 8 + e.start})") from None

    def value(kind: int, what: str):
        if kind == 8:
            string(what)
        elif kind == 9:
            start = pos
            inner, count = u32(what + " array type"), u64(what + " array length")
            if inner not in _SIZES and inner not in (8, 9):
                raise _Stop(f"{what} at byte {start}: unknown array element type {inner}")
            if inner in _SIZES and count * _SIZES[inner] > len(data) - pos:
                raise _Stop(f"{what} at byte {start}: {count} elements do not fit in the file")
            for _ in range(count):
                value(inner, what)
        elif kind in _SIZES:
            take(_SIZES[kind], what)
        else:
            raise _Stop(f"{what} at byte {pos - 4}: unknown value type {kind}")

    try:
        if take(4, "header magic") != b"GGUF":
            return "header at byte 0: the magic is not 'GGUF'"
        version = u32("header version")
        if version not in (2, 3):
            return f"header at byte 4: version {version} (2 and 3 are read)"
        tensors, keys = u64("header tensor count"), u64("header metadata count")
        for i in range(keys):
            start = pos
            key = string(f"metadata key #{i}")
            try:
                value(u32(f"metadata key '{key}' type"), f"metadata key '{key}'")
            except _Stop as e:
                raise _Stop(f"{e} (the key starts at byte {start})") from None
        for i in range(tensors):
            name = string(f"tensor record #{i}")
            dims = u32(f"tensor '{name}' dimension count")
            if dims > 8:
                return f"tensor '{name}' at byte {pos - 4}: {dims} dimensions"
            take(8 * dims + 12, f"tensor '{name}' shape/type/offset")
    except _Stop as e:
        return str(e)
    return f"tensor data after the header (byte {pos})"
