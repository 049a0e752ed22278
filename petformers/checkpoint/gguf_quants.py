"""GGUF tensor types petformers writes, and the quantizers that produce their bytes.

The `gguf` package (llama.cpp's own Python library) quantizes BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1:
those go through `gguf.quants.quantize` unchanged. It cannot quantize the K-quants (it only
dequantizes them), so Q4_K, Q5_K and Q6_K are written here, vectorised over blocks with numpy,
following llama.cpp's reference quantizers (`quantize_row_q4_K_ref`, `quantize_row_q5_K_ref`,
`quantize_row_q6_K_ref` and their `make_qkx2_quants` / `make_qx_quants` in ggml-quants.c) step for
step: every product and sum in float32 in C's order (C's int levels become float32 in each product),
so the bytes are llama.cpp's own; tests compare them with llama.cpp's quantizer bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK_K = 256


@dataclass(frozen=True)
class OutType:
    """One `--outtype`: the GGML type of 2-D weights and the `general.file_type` llama.cpp shows."""
    name: str
    qtype: str  # gguf.GGMLQuantizationType member name
    file_type: str  # gguf.LlamaFileType member name


OUTTYPES = {o.name: o for o in (
    OutType("f32", "F32", "ALL_F32"),
    OutType("f16", "F16", "MOSTLY_F16"),
    OutType("bf16", "BF16", "MOSTLY_BF16"),
    OutType("q8_0", "Q8_0", "MOSTLY_Q8_0"),
    OutType("q4_0", "Q4_0", "MOSTLY_Q4_0"),
    OutType("q4_1", "Q4_1", "MOSTLY_Q4_1"),
    OutType("q5_0", "Q5_0", "MOSTLY_Q5_0"),
    OutType("q5_1", "Q5_1", "MOSTLY_Q5_1"),
    OutType("q4_k", "Q4_K", "MOSTLY_Q4_K_M"),  # as in llama-quantize, Q4_K is an alias of the Q4_K_M mix
    OutType("q4_k_m", "Q4_K", "MOSTLY_Q4_K_M"),
    OutType("q4_k_s", "Q4_K", "MOSTLY_Q4_K_S"),
    OutType("q6_k", "Q6_K", "MOSTLY_Q6_K"),
)}



def check_outtype(value) -> str | None:
    """A GGUF outtype from a config (None / false: no GGUF); ValueError names the choices."""
    if value in (None, False, "", "none", "None"):
        return None
    name = str(value).lower()
    if name not in OUTTYPES:
        raise ValueError(f"must be one of {', '.join(OUTTYPES)}, got {value!r}")
    return name


# What llama.cpp's quantizer uses when a row length is not a multiple of the type's block size
# (e.g. 576-wide SmolLM2 rows and the 256-wide K-quant blocks): `tensor_type_fallback` in llama-quant.cpp.
FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0", "Q5_K": "Q5_1", "Q4_0": "F16", "Q4_1": "F16", "Q5_0": "F16",
            "Q5_1": "F16", "Q8_0": "F16", "BF16": "BF16", "F16": "F16", "F32": "F32"}


def ggml_type(name: str):
    import gguf  # heavy (its writer and quant tables): only GGUF exports pay for it

    return gguf.GGMLQuantizationType[name]


def block_size(qtype: str) -> int:
    import gguf  # heavy (its writer and quant tables): only GGUF exports pay for it

    return gguf.GGML_QUANT_SIZES[ggml_type(qtype)][0]


def fits(qtype: str, row_length: int) -> bool:
    """Whether rows of this length split into whole blocks of `qtype`."""
    return row_length % block_size(qtype) == 0


def usable_type(qtype: str, row_length: int) -> str:
    """`qtype`, or llama.cpp's fallback type when the rows do not split into its blocks."""
    while not fits(qtype, row_length):
        qtype = FALLBACK[qtype]
    return qtype


def nbytes(qtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of `shape` (numpy order, rows last) stored as `qtype`."""
    import gguf  # heavy (its writer and quant tables): only GGUF exports pay for it

    block, size = gguf.GGML_QUANT_SIZES[ggml_type(qtype)]
    n = int(np.prod(shape))
    return n // block * size


def quantize(array: np.ndarray, qtype: str) -> np.ndarray:
    """float32 array [..., row] -> the GGUF bytes (uint8 [..., row_bytes]) or float array of `qtype`."""
    import gguf  # heavy (its writer and quant tables): only GGUF exports pay for it

    array = np.ascontiguousarray(array, dtype=np.float32)
    if qtype in _K_QUANTIZERS:
        with np.errstate(all="ignore"):  # flat and all-zero blocks divide by zero; they are masked out
            return _blocks_apply(array, _K_QUANTIZERS[qtype])
    return gguf.quants.quantize(array, ggml_type(qtype))


def _blocks_apply(array: np.ndarray, fn) -> np.ndarray:
    rows = array.reshape(-1, QK_K)
    out = np.concatenate([fn(rows[i:i + 4096]) for i in range(0, len(rows), 4096)]) if len(rows) else \
        np.zeros((0, 0), np.uint8)
    return out.reshape(*array.shape[:-1], -1)


# ---- llama.cpp's reference K-quantizers, vectorised over blocks ---------------------------------

def _nearest_int(x: np.ndarray) -> np.ndarray:
    """C's `nearest_int` (round half to even through the 1.5*2^23 trick, as lrintf does)."""
    return np.rint(x).astype(np.int32)


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis left to right in float32, as C's loops do (numpy's pairwise sum along a
    contiguous axis rounds differently, moving a scale by one unit in the last place now and then).
    Reducing over the outer axis of the transposed copy adds whole rows in order: the C order."""
    return np.add.reduce(np.ascontiguousarray(np.moveaxis(a, -1, 0)), axis=0, dtype=np.float32)


def _make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float = -1.0, rdelta: float = 0.1,
                      nstep: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale and min for each row of x [n, 32] minimising the weighted error (ggml's make_qkx2_quants,
    use_mad=False). Returns (scale [n], the_min [n] >= 0, L [n, 32] uint8)."""
    x = x.astype(np.float32)
    min_ = np.minimum(x.min(axis=1), np.float32(0))
    max_ = x.max(axis=1)
    sum_w = _seqsum(weights)
    sum_x = _seqsum(weights * x)
    flat = max_ == min_
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(flat, 0, np.float32(nmax) / (max_ - min_)).astype(np.float32)
        scale = np.where(flat, 0, 1 / iscale).astype(np.float32)
    L = np.clip(_nearest_int(iscale[:, None] * (x - min_[:, None])), 0, nmax)
    diff = scale[:, None] * L.astype(np.float32) + min_[:, None] - x  # float32 levels, as C converts them
    best_mad = _seqsum(weights * (diff * diff))
    for step in range(nstep + 1):
        iscale_t = ((np.float32(rmin) + np.float32(rdelta) * step + nmax) / (max_ - min_)).astype(np.float32)
        Laux = np.clip(_nearest_int(iscale_t[:, None] * (x - min_[:, None])), 0, nmax).astype(np.float32)
        sum_l = _seqsum(weights * Laux)
        sum_l2 = _seqsum(weights * Laux * Laux)
        sum_xl = _seqsum(weights * Laux * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = ((sum_w * sum_xl - sum_x * sum_l) / D).astype(np.float32)
            this_min = ((sum_l2 * sum_x - sum_l * sum_xl) / D).astype(np.float32)
        pos_min = this_min > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = np.where(pos_min, sum_xl / sum_l2, this_scale).astype(np.float32)
        this_min = np.where(pos_min, np.float32(0), this_min).astype(np.float32)
        diff = this_scale[:, None] * Laux + this_min[:, None] - x
        mad = _seqsum(weights * (diff * diff))
        better = ok & (mad < best_mad) & ~flat
        L = np.where(better[:, None], Laux.astype(np.int32), L)
        best_mad = np.where(better, mad, best_mad)
        scale = np.where(better, this_scale, scale)
        min_ = np.where(better, this_min, min_)
    L = np.where(flat[:, None], 0, L)
    scale = np.where(flat, 0, scale).astype(np.float32)
    return scale, -min_.astype(np.float32), L.astype(np.uint8)


def _k_scales_and_levels(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """What Q4_K and Q5_K share (quantize_row_q4_K_ref / quantize_row_q5_K_ref): per sub-block of 32 a
    scale and min from make_qkx2_quants (weights av_x + |x|), both coded on 6 bits against the block's
    f16 d / dmin, then every sub-block requantized with the coded scales.
    Returns (d, dmin as f16 [n], the 12 packed scale bytes [n, 12], levels [n, 8, 32] in [0, nmax])."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    # av_x = sqrt(sum x^2 / 32); weights = av_x + |x|
    av_x = np.sqrt(_seqsum(sub * sub) / np.float32(32)).astype(np.float32)
    weights = (av_x[:, None] + np.abs(sub)).astype(np.float32)
    scales, mins, L0 = _make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    # C starts both maxima at +0: an all-zero block gets +0, not the -0 of `-min`.
    max_scale = np.where(scales.max(axis=1) > 0, scales.max(axis=1), np.float32(0))
    max_min = np.where(mins.max(axis=1) > 0, mins.max(axis=1), np.float32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, np.float32(63) / max_scale, 0).astype(np.float32)
        inv_min = np.where(max_min > 0, np.float32(63) / max_min, 0).astype(np.float32)
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales), 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins), 63).astype(np.uint8)
    packed = np.zeros((n, 12), np.uint8)
    packed[:, 0:4] = ls[:, 0:4]
    packed[:, 4:8] = lm[:, 0:4]
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    packed[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    packed[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    d = (max_scale / np.float32(63)).astype(np.float16)
    dmin = (max_min / np.float32(63)).astype(np.float16)
    # Requantize every sub-block with the rounded scales.
    dl = (d.astype(np.float32)[:, None] * ls).astype(np.float32)
    dm = (dmin.astype(np.float32)[:, None] * lm).astype(np.float32)
    xs = x.reshape(n, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = _nearest_int((xs + dm[..., None]) / dl[..., None])
    # A sub-block whose rounded scale is 0 keeps the levels of the search (llama.cpp's `continue`).
    q = np.where(dl[..., None] != 0, np.clip(q, 0, nmax), L0.reshape(n, 8, 32)).astype(np.uint8)
    return d, dmin, packed, q


def _quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Rows of 256 floats -> block_q4_K bytes (144 each): d, dmin (f16), 12 bytes of 6-bit scales/mins,
    128 bytes of 4-bit quants."""
    n = x.shape[0]
    d, dmin, packed, q = _k_scales_and_levels(x, 15, -1.0, 20)
    # 4-bit pairs: sub-blocks (2j, 2j+1) share 32 bytes, low nibble from the first.
    q = q.reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([d.reshape(n, 1).view(np.uint8), dmin.reshape(n, 1).view(np.uint8), packed, qs], axis=1)


def _quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """Rows of 256 floats -> block_q5_K bytes (176 each): d, dmin (f16), 12 bytes of 6-bit scales/mins,
    32 bytes of fifth bits, 128 bytes of low nibbles."""
    n = x.shape[0]
    d, dmin, packed, q = _k_scales_and_levels(x, 31, -0.5, 15)
    # Sub-blocks (2j, 2j+1) share 32 nibble bytes (low nibble from the first); their fifth bits are
    # bits 2j and 2j+1 of qh[l] for the l-th value of each.
    q = q.reshape(n, 4, 2, 32)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(n, 128)
    high = (q >> 4).astype(np.uint8).reshape(n, 8, 32)
    qh = np.zeros((n, 32), np.uint8)
    for j in range(8):
        qh |= high[:, j] << j
    return np.concatenate([d.reshape(n, 1).view(np.uint8), dmin.reshape(n, 1).view(np.uint8), packed, qh, qs],
                          axis=1)


def _make_qx_quants_rmse1(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants with rmse_type=1 and no quant weights (weights = x^2), rows of 16.
    Returns (scale [n], L [n, 16] in [0, 2*nmax))."""
    amax_idx = np.abs(x).argmax(axis=1)
    max_ = np.take_along_axis(x, amax_idx[:, None], axis=1)[:, 0]
    amax = np.abs(max_)
    zero = amax < np.float32(1e-30)  # GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = (np.float32(-nmax) / max_).astype(np.float32)
    w = (x * x).astype(np.float32)
    Lq = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
    # The levels are C ints converted to float in each product: float32 here too (an int32 array
    # would promote the products to float64 and round them once instead of twice).
    Lf = Lq.astype(np.float32)
    sumlx = _seqsum(w * x * Lf)
    suml2 = _seqsum(w * Lf * Lf)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 > 0, sumlx / suml2, 0).astype(np.float32)
    best = (scale * sumlx).astype(np.float32)
    L = Lq
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        iscale_t = (np.float32(-(nmax + np.float32(0.1) * is_)) / max_).astype(np.float32)
        Lt = np.clip(_nearest_int(iscale_t[:, None] * x), -nmax, nmax - 1)
        Lf = Lt.astype(np.float32)
        sumlx_t = _seqsum(w * x * Lf)
        suml2_t = _seqsum(w * Lf * Lf)
        better = (suml2_t > 0) & (sumlx_t * sumlx_t > best * suml2_t)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_scale = (sumlx_t / suml2_t).astype(np.float32)
        L = np.where(better[:, None], Lt, L)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, (scale * sumlx_t).astype(np.float32), best)
    L = np.where(zero[:, None], 0, L + nmax)
    scale = np.where(zero, 0, scale).astype(np.float32)
    return scale, L


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Rows of 256 floats -> block_q6_K bytes (210 each): 128 bytes low nibbles, 64 bytes high 2-bit
    pairs, 16 int8 scales, d (f16)."""
    n = x.shape[0]
    sub = x.reshape(n * 16, 16).astype(np.float32)
    scales, L0 = _make_qx_quants_rmse1(sub, 32)
    scales = scales.reshape(n, 16)
    abs_idx = np.abs(scales).argmax(axis=1)
    max_scale = np.take_along_axis(scales, abs_idx[:, None], axis=1)[:, 0]
    zero = np.abs(max_scale) < np.float32(1e-30)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = (np.float32(-128) / max_scale).astype(np.float32)
    d = np.where(zero, 0, np.float32(1) / iscale).astype(np.float16)
    sc = np.where(zero[:, None], 0, np.minimum(_nearest_int(iscale[:, None] * scales), 127)).astype(np.int8)
    dl = (d.astype(np.float32)[:, None] * sc.astype(np.float32)).astype(np.float32)
    xs = x.reshape(n, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = _nearest_int(xs / dl[..., None])
    q = np.where(dl[..., None] != 0, np.clip(q, -32, 31) + 32, L0.reshape(n, 16, 16)).astype(np.uint8)
    q = q.reshape(n, 2, 4, 32)
    # Per 128-value half: ql[l] = q[l] | q[l+64]<<4, ql[l+32] = q[l+32] | q[l+96]<<4,
    # qh[l] = q[l]>>4 | (q[l+32]>>4)<<2 | (q[l+64]>>4)<<4 | (q[l+96]>>4)<<6.
    q1, q2, q3, q4 = q[:, :, 0], q[:, :, 1], q[:, :, 2], q[:, :, 3]
    ql = np.concatenate([(q1 & 0xF) | ((q3 & 0xF) << 4), (q2 & 0xF) | ((q4 & 0xF) << 4)], axis=2).reshape(n, 128)
    qh = ((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)).reshape(n, 64)
    zero_rows = zero[:, None]
    ql = np.where(zero_rows, 0, ql).astype(np.uint8)
    qh = np.where(zero_rows, 0, qh).astype(np.uint8)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.reshape(n, 1).view(np.uint8)], axis=1)


_K_QUANTIZERS = {"Q4_K": _quantize_q4_k, "Q5_K": _quantize_q5_k, "Q6_K": _quantize_q6_k}
