"""llama.cpp's block types: ggml's reference quantizers in float32, bit for bit, and their bytes.

Each ``encode_*`` takes float32 blocks (rows, block) of one type's block length and returns a
``GgmlBlocks``: the integers and scales a GGUF block stores, unpacked. ``decode`` turns them back
into values the way ggml's ``dequantize_row_*`` (and ``gguf.quants``) do; ``to_bytes`` and
``from_bytes`` lay them out as GGUF stores them (ggml-common.h's ``block_*`` structs).

The arithmetic follows ggml's ``quantize_row_*_ref`` step by step in float32: the same
products and quotients in the same order, sums accumulated element by element (vectorized across
blocks, never reassociated), ``nearest_int`` as round half to even, ``roundf`` as half away from
zero, C's float-to-integer casts as truncation, and fp16 scales rounded to nearest even. That
makes them equal, byte for byte, to what ``llama-quantize`` writes without an importance matrix.

Non-finite input: ggml's reference has no defined result for a block holding NaN or Inf (its
integer casts of NaN are undefined behaviour, and ``llama-quantize`` rejects such rows); here
such a block stores a NaN scale, so every value of it dequantizes to NaN, which is also what
``gguf.quants`` gives after dequantizing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GROUP_MAX_EPS = 1e-15


@dataclass
class GgmlBlocks:
    """A tensor in one ggml type, blocked as (rows, block): what its GGUF blocks hold.

    ``codes``: int32 (rows, block), the integers as ggml keeps them before packing bits (Q4_0:
    0 .. 15 standing for -8 .. 7; Q8_0: -127 .. 127; MXFP4: E2M1 codes). ``d``: (rows, 1) float32
    value of the block scale (fp16, fp32 for Q8_K; for MXFP4 the E8M0 byte). ``m``: (rows, 1)
    the fp16 minimum (Q4_1, Q5_1) or super-block min scale dmin (Q4_K, Q5_K). ``sc``/``mn``:
    (rows, n_sub) int32 sub-block scales and mins of the k-quants."""

    type_name: str
    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    mn: torch.Tensor | None = None


# ---- float32 helpers that mirror C ---------------------------------------------------------------


def fp16(x: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16 then back: round to nearest even, overflow to Inf."""
    return x.to(torch.float16).to(torch.float32)


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int (adds 1.5 * 2**23): round half to even, as int32."""
    return torch.round(x).to(torch.int32)


def roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: half away from zero (x - trunc(x) is exact in float32)."""
    t = torch.trunc(x)
    return torch.where((x - t).abs() == 0.5, t + torch.sign(x), torch.round(x))


def f32(v) -> torch.Tensor:
    return torch.tensor(np.float32(v), dtype=torch.float32)


def rdiv(numerator, t: torch.Tensor) -> torch.Tensor:
    """``numerator / t`` as an IEEE float32 division. (torch computes ``number / tensor`` as
    ``reciprocal(tensor) * number``, which rounds twice.)"""
    return torch.div(torch.full_like(t, float(np.float32(numerator))), t)


def sqrtf(x: torch.Tensor) -> torch.Tensor:
    """C's sqrtf, correctly rounded: torch's vectorized float32 sqrt is not always; the float64
    root rounded to float32 is (53 bits are more than twice 24 + 2)."""
    return torch.sqrt(x.to(torch.float64)).to(torch.float32)


def first_absmax(x: torch.Tensor) -> torch.Tensor:
    """The signed value of largest magnitude, the first one on ties (C: ``if (amax < fabsf(v))``,
    starting from +0, so a block of zeros of either sign gives +0)."""
    top = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))
    return torch.where(top == 0, 0.0, top)


def first_min(x: torch.Tensor) -> torch.Tensor:
    """C's ``if (v < min) min = v`` from FLT_MAX: the first minimal value (its zero's sign kept)."""
    return x.gather(-1, x.argmin(dim=-1, keepdim=True))


def first_max(x: torch.Tensor) -> torch.Tensor:
    return x.gather(-1, x.argmax(dim=-1, keepdim=True))


def seq_sum(terms: torch.Tensor) -> torch.Tensor:
    """Sum along the last axis one element after another, as a C loop adds in float32."""
    total = terms[..., 0].clone()
    for i in range(1, terms.shape[-1]):
        total = total + terms[..., i]
    return total


def safe_reciprocal(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1.0f/d : 0.0f``."""
    return torch.where(d != 0, rdiv(1.0, torch.where(d != 0, d, 1.0)), 0.0)


def nan_where(bad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A NaN scale for the blocks that held NaN/Inf (the sign of a zero scale kept elsewhere)."""
    return torch.where(bad, float("nan"), scale)


def split_finite(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks with non-finite blocks zeroed, (rows, 1) mask of the blocks that held NaN/Inf)."""
    bad = ~torch.isfinite(blocks).all(dim=-1, keepdim=True)
    return torch.where(bad, 0.0, blocks), bad


# ---- legacy types: one fp16 scale per 32 ------------------------------------------------------------


def encode_q8_0(x: torch.Tensor) -> GgmlBlocks:
    x, bad = split_finite(x)
    d = x.abs().amax(dim=-1, keepdim=True) / 127.0
    q = roundf(x * safe_reciprocal(d)).to(torch.int32)
    return GgmlBlocks("Q8_0", q, nan_where(bad, fp16(d)))


def _symmetric(x: torch.Tensor, levels: int, type_name: str) -> GgmlBlocks:
    # Q4_0 (levels 8) and Q5_0 (16): d = max / -levels, q = MIN(2 levels - 1, (int8_t)(x id + levels + 0.5))
    x, bad = split_finite(x)
    d = first_absmax(x) / float(-levels)
    v = x * safe_reciprocal(d) + (levels + 0.5)
    q = torch.trunc(v).to(torch.int32).clamp(max=2 * levels - 1)
    return GgmlBlocks(type_name, q, nan_where(bad, fp16(d)))


def encode_q4_0(x: torch.Tensor) -> GgmlBlocks:
    return _symmetric(x, 8, "Q4_0")


def encode_q5_0(x: torch.Tensor) -> GgmlBlocks:
    return _symmetric(x, 16, "Q5_0")


def _with_min(x: torch.Tensor, nmax: int, type_name: str) -> GgmlBlocks:
    # Q4_1 (nmax 15) and Q5_1 (31): d = (max - min) / nmax, q = (x - min) id + 0.5 truncated
    x, bad = split_finite(x)
    lo = first_min(x)
    d = (first_max(x) - lo) / float(nmax)
    q = torch.trunc((x - lo) * safe_reciprocal(d) + 0.5).to(torch.int32)
    # Q4_1 clamps with MIN(15, .); Q5_1 casts to uint8 and keeps 5 bits
    q = q.clamp(max=nmax) if nmax == 15 else q & 31
    return GgmlBlocks(type_name, q, nan_where(bad, fp16(d)), nan_where(bad, fp16(lo)))


def encode_q4_1(x: torch.Tensor) -> GgmlBlocks:
    return _with_min(x, 15, "Q4_1")


def encode_q5_1(x: torch.Tensor) -> GgmlBlocks:
    return _with_min(x, 31, "Q5_1")


# ---- k-quants: 256-element super-blocks ---------------------------------------------------------------


def _weighted_sums(w, x, levels):
    wl = w * levels
    return seq_sum(wl), seq_sum(wl * levels), seq_sum(wl * x)


def _squared_error(w, scale, levels, lo, x):
    diff = scale[:, None] * levels + lo[:, None] - x
    return seq_sum(w * (diff * diff))


def make_qkx2_quants(x, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml's make_qkx2_quants (use_mad false) on rows of ``x`` with weights ``w``: (scale, -min, L)."""
    lo = x.amin(dim=1).clamp(max=0.0)  # C: ``if (min > 0) min = 0``
    hi = x.amax(dim=1)
    sum_w = seq_sum(w)
    sum_x = seq_sum(w * x)
    flat = hi == lo
    span = torch.where(flat, 1.0, hi - lo)
    iscale = rdiv(nmax, span)
    scale = rdiv(1.0, iscale)
    levels = nearest_int(iscale[:, None] * (x - lo[:, None])).clamp(0, nmax).to(torch.float32)
    best = _squared_error(w, scale, levels, lo, x)
    for step in range(nstep + 1):
        # C recomputes (max - min) with the best min so far
        span = torch.where(flat | (hi == lo), 1.0, hi - lo)
        factor = np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)
        aux = nearest_int(rdiv(factor, span)[:, None] * (x - lo[:, None])).clamp(0, nmax).to(torch.float32)
        sum_l, sum_l2, sum_xl = _weighted_sums(w, x, aux)
        det = sum_w * sum_l2 - sum_l * sum_l
        safe = torch.where(det > 0, det, 1.0)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / torch.where(sum_l2 != 0, sum_l2, 1.0), this_scale)
        this_min = torch.where(positive, 0.0, this_min)
        error = _squared_error(w, this_scale, aux, this_min, x)
        better = (det > 0) & (error < best)
        best = torch.where(better, error, best)
        levels = torch.where(better[:, None], aux, levels)
        scale = torch.where(better, this_scale, scale)
        lo = torch.where(better, this_min, lo)
    scale = torch.where(flat, 0.0, scale)
    levels = torch.where(flat[:, None], 0.0, levels)
    return scale, -lo, levels.to(torch.int32)


def _kquant_scales(scales, mins):
    """Sub-block scales and mins of Q4_K/Q5_K to 6 bits under fp16 d and dmin."""
    # C: ``if (scale > max_scale) max_scale = scale`` from +0 (a -0 never replaces it)
    max_scale = scales.amax(dim=1, keepdim=True)
    max_scale = torch.where(max_scale > 0, max_scale, 0.0)
    max_min = mins.amax(dim=1, keepdim=True)
    max_min = torch.where(max_min > 0, max_min, 0.0)
    inv_scale = torch.where(max_scale > 0, rdiv(63.0, torch.where(max_scale > 0, max_scale, 1.0)), 0.0)
    inv_min = torch.where(max_min > 0, rdiv(63.0, torch.where(max_min > 0, max_min, 1.0)), 0.0)
    ls = (nearest_int(inv_scale * scales) & 255).clamp(max=63)  # uint8_t, then MIN(63, .)
    lm = (nearest_int(inv_min * mins) & 255).clamp(max=63)
    return ls, lm, fp16(max_scale / 63.0), fp16(max_min / 63.0)


def _encode_qk_min(x: torch.Tensor, nmax: int, rmin: float, nstep: int, type_name: str) -> GgmlBlocks:
    x, bad = split_finite(x)
    rows = x.shape[0]
    sub = x.reshape(rows * 8, 32)
    av_x = sqrtf(seq_sum(sub * sub) / 32.0)
    weights = av_x[:, None] + sub.abs()
    scales, mins, levels = make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep)
    ls, lm, d, dmin = _kquant_scales(scales.reshape(rows, 8), mins.reshape(rows, 8))
    d_sub = (d * ls.to(torch.float32)).reshape(-1, 1)
    dm_sub = (dmin * lm.to(torch.float32)).reshape(-1, 1)
    fresh = nearest_int((sub + dm_sub) / torch.where(d_sub != 0, d_sub, 1.0)).clamp(0, nmax)
    levels = torch.where(d_sub != 0, fresh, levels)  # C: ``if (!d) continue;`` keeps the first levels
    return GgmlBlocks(type_name, levels.reshape(rows, 256), nan_where(bad, d), nan_where(bad, dmin), ls, lm)


def encode_q4_k(x: torch.Tensor) -> GgmlBlocks:
    return _encode_qk_min(x, 15, -1.0, 20, "Q4_K")


def encode_q5_k(x: torch.Tensor) -> GgmlBlocks:
    return _encode_qk_min(x, 31, -0.5, 15, "Q5_K")


def make_qx_quants(x: torch.Tensor, nmax: int):
    """ggml's make_qx_quants with rmse_type 1 and no weights, on rows of ``x``: (scale, L)."""
    top = first_absmax(x).squeeze(1)
    zero = top.abs() < GROUP_MAX_EPS
    top = torch.where(zero, 1.0, top)
    w = x * x

    def attempt(iscale):
        lv = nearest_int(iscale[:, None] * x).clamp(-nmax, nmax - 1).to(torch.float32)
        return lv, seq_sum(w * x * lv), seq_sum(w * lv * lv)

    levels, sumlx, suml2 = attempt(rdiv(-nmax, top))
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, 1.0), 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        factor = -(np.float32(nmax) + np.float32(0.1) * np.float32(step))
        lv, sumlx, suml2 = attempt(rdiv(factor, top))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        levels = torch.where(better[:, None], lv, levels)
        scale = torch.where(better, sumlx / torch.where(suml2 > 0, suml2, 1.0), scale)
        best = torch.where(better, scale * sumlx, best)
    levels = torch.where(zero[:, None], -float(nmax), levels)  # L = 0 is level -nmax
    return torch.where(zero, 0.0, scale), levels.to(torch.int32) + nmax


def encode_q6_k(x: torch.Tensor) -> GgmlBlocks:
    x, bad = split_finite(x)
    rows = x.shape[0]
    sub = x.reshape(rows * 16, 16)
    scales, levels = make_qx_quants(sub, 32)
    scales = scales.reshape(rows, 16)
    max_scale = first_absmax(scales)
    empty = max_scale.abs() < GROUP_MAX_EPS
    iscale = rdiv(-128.0, torch.where(empty, 1.0, max_scale))
    d = torch.where(empty, 0.0, fp16(rdiv(1.0, iscale)))
    sc = torch.where(empty, 0, nearest_int(iscale * scales).clamp(max=127))
    d_sub = (d * sc.to(torch.float32)).reshape(-1, 1)
    fresh = nearest_int(sub / torch.where(d_sub != 0, d_sub, 1.0)).clamp(-32, 31) + 32
    levels = torch.where(d_sub != 0, fresh, levels).reshape(rows, 256)
    levels = torch.where(empty, 0, levels)  # an empty block is all zero bytes
    return GgmlBlocks("Q6_K", levels, nan_where(bad, d), sc=sc)


def encode_q8_k(x: torch.Tensor) -> GgmlBlocks:
    x, bad = split_finite(x)
    top = first_absmax(x)
    empty = top == 0
    iscale = rdiv(-127.0, torch.where(empty, 1.0, top))
    q = torch.where(empty, 0, nearest_int(iscale * x).clamp(max=127))
    d = torch.where(empty, 0.0, rdiv(1.0, iscale))
    return GgmlBlocks("Q8_K", q, nan_where(bad, d))


ENCODERS = {
    "Q8_0": encode_q8_0,
    "Q4_0": encode_q4_0,
    "Q4_1": encode_q4_1,
    "Q5_0": encode_q5_0,
    "Q5_1": encode_q5_1,
    "Q4_K": encode_q4_k,
    "Q5_K": encode_q5_k,
    "Q6_K": encode_q6_k,
    "Q8_K": encode_q8_k,
}

# ---- dequantization ---------------------------------------------------------------------------------

_OFFSET = {"Q4_0": 8, "Q5_0": 16, "Q6_K": 32}


def decode(blocks: GgmlBlocks) -> torch.Tensor:
    """The float32 values, as ggml's dequantize_row_* and gguf.quants compute them."""
    t, q = blocks.type_name, blocks.codes.to(torch.float32)
    if t in ("Q8_0", "Q8_K"):
        return blocks.d * q
    if t in ("Q4_0", "Q5_0"):
        return blocks.d * (q - _OFFSET[t])
    if t in ("Q4_1", "Q5_1"):
        return blocks.d * q + blocks.m
    if t == "MXFP4":
        raise ValueError("MXFP4 blocks decode through mpqc's mxfp4 format (mpqc.formats.quantize(x, 'mxfp4'))")
    rows = q.shape[0]
    n_sub = blocks.sc.shape[1]
    d_sub = (blocks.d * blocks.sc.to(torch.float32)).unsqueeze(-1)
    q = q.reshape(rows, n_sub, -1)
    if t == "Q6_K":
        return (d_sub * (q - 32)).reshape(rows, -1)
    m_sub = (blocks.m * blocks.mn.to(torch.float32)).unsqueeze(-1)
    return (d_sub * q - m_sub).reshape(rows, -1)


# ---- GGUF bytes ---------------------------------------------------------------------------------------


def _u8(t: torch.Tensor) -> torch.Tensor:
    return (t & 255).to(torch.uint8)


def _half_bytes(v: torch.Tensor) -> torch.Tensor:
    """(rows, 1) float32 holding fp16 values -> (rows, 2) little-endian bytes."""
    return v.to(torch.float16).view(torch.uint8).reshape(v.shape[0], 2)


def _read_half(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32).reshape(-1, 1)


def _nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return _u8((lo & 15) | ((hi & 15) << 4))


def _high_bits_u32(q: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1's qh: bit j is bit 4 of code j, as 4 little-endian bytes."""
    bits = ((q >> 4) & 1).to(torch.int64) << torch.arange(32, dtype=torch.int64)
    word = bits.sum(dim=1, keepdim=True)
    return _u8(word >> torch.tensor([0, 8, 16, 24], dtype=torch.int64)).reshape(-1, 4)


def _pack_kscales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """The 12 scale bytes of Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins."""
    out = torch.zeros(ls.shape[0], 12, dtype=torch.int32)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 15) | ((lm[:, 4:8] & 15) << 4)
    return _u8(out)


def _unpack_kscales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = s.to(torch.int32)
    ls = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    lm = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return ls, lm


def _pack_q4k_codes(q: torch.Tensor) -> torch.Tensor:
    chunks = q.reshape(-1, 4, 2, 32)  # 64 codes per chunk: low nibbles the first 32, high the next
    return _nibbles(chunks[:, :, 0], chunks[:, :, 1]).reshape(-1, 128)


def _unpack_q4k_codes(b: torch.Tensor) -> torch.Tensor:
    b = b.to(torch.int32).reshape(-1, 4, 1, 32)
    return torch.cat([b & 15, b >> 4], dim=2).reshape(-1, 256)


def _pack_q6k(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    halves = q.reshape(-1, 2, 4, 32)  # per 128: q1 q2 q3 q4 at offsets 0, 32, 64, 96
    q1, q2, q3, q4 = (halves[:, :, i] for i in range(4))
    ql = torch.cat([_nibbles(q1, q3), _nibbles(q2, q4)], dim=2).reshape(-1, 128)
    qh = _u8((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)).reshape(-1, 64)
    return ql, qh


def _unpack_q6k(ql: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    ql = ql.to(torch.int32).reshape(-1, 2, 2, 32)
    qh = qh.to(torch.int32).reshape(-1, 2, 32)
    low = [ql[:, :, 0] & 15, ql[:, :, 1] & 15, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4]
    q = [low[i] | (((qh >> (2 * i)) & 3) << 4) for i in range(4)]
    return torch.stack(q, dim=2).reshape(-1, 256)


def to_bytes(b: GgmlBlocks) -> torch.Tensor:
    """(rows, block_bytes) uint8: the GGUF blocks of ``b``, in ggml-common.h's struct layouts."""
    t, q = b.type_name, b.codes
    if t == "Q8_0":
        return torch.cat([_half_bytes(b.d), _u8(q)], dim=1)
    if t == "Q8_K":
        sums = q.reshape(-1, 16, 16).sum(dim=2).to(torch.int16).view(torch.uint8).reshape(-1, 32)
        return torch.cat([b.d.view(torch.uint8).reshape(-1, 4), _u8(q), sums], dim=1)
    if t in ("Q4_0", "Q4_1", "MXFP4"):
        head = [b.d.to(torch.uint8)] if t == "MXFP4" else [_half_bytes(b.d)]
        head += [_half_bytes(b.m)] if t == "Q4_1" else []
        return torch.cat([*head, _nibbles(q[:, :16], q[:, 16:])], dim=1)
    if t in ("Q5_0", "Q5_1"):
        head = [_half_bytes(b.d)] + ([_half_bytes(b.m)] if t == "Q5_1" else [])
        return torch.cat([*head, _high_bits_u32(q), _nibbles(q[:, :16], q[:, 16:])], dim=1)
    if t in ("Q4_K", "Q5_K"):
        parts = [_half_bytes(b.d), _half_bytes(b.m), _pack_kscales(b.sc, b.mn)]
        if t == "Q5_K":
            high = ((q >> 4) & 1).reshape(-1, 8, 32) << torch.arange(8, dtype=torch.int32)[None, :, None]
            parts.append(_u8(high.sum(dim=1)))
        return torch.cat([*parts, _pack_q4k_codes(q & 15)], dim=1)
    if t == "Q6_K":
        ql, qh = _pack_q6k(q)
        return torch.cat([ql, qh, _u8(b.sc), _half_bytes(b.d)], dim=1)
    raise ValueError(f"no GGUF layout for {t}")


def from_bytes(type_name: str, data: torch.Tensor) -> GgmlBlocks:
    """Inverse of ``to_bytes``: (rows, block_bytes) uint8 -> the blocks' integers and scales."""
    t, data = type_name, data.contiguous()
    if t == "Q8_0":
        return GgmlBlocks(t, data[:, 2:].view(torch.int8).to(torch.int32), _read_half(data[:, :2]))
    if t in ("Q4_0", "Q4_1"):
        start = 4 if t == "Q4_1" else 2
        nib = data[:, start:].to(torch.int32)
        m = _read_half(data[:, 2:4]) if t == "Q4_1" else None
        return GgmlBlocks(t, torch.cat([nib & 15, nib >> 4], dim=1), _read_half(data[:, :2]), m)
    if t in ("Q5_0", "Q5_1"):
        start = 4 if t == "Q5_1" else 2
        qh = data[:, start : start + 4].to(torch.int64)
        word = (qh << torch.tensor([0, 8, 16, 24], dtype=torch.int64)).sum(dim=1, keepdim=True)
        high = ((word >> torch.arange(32, dtype=torch.int64)) & 1).to(torch.int32) << 4
        nib = data[:, start + 4 :].to(torch.int32)
        m = _read_half(data[:, 2:4]) if t == "Q5_1" else None
        return GgmlBlocks(t, torch.cat([nib & 15, nib >> 4], dim=1) | high, _read_half(data[:, :2]), m)
    if t in ("Q4_K", "Q5_K"):
        ls, lm = _unpack_kscales(data[:, 4:16])
        q = _unpack_q4k_codes(data[:, -128:])
        if t == "Q5_K":
            qh = data[:, 16:48].to(torch.int32)
            high = (qh[:, None, :] >> torch.arange(8, dtype=torch.int32)[None, :, None]) & 1
            q = q | (high.reshape(-1, 256) << 4)
        return GgmlBlocks(t, q, _read_half(data[:, 0:2]), _read_half(data[:, 2:4]), ls, lm)
    if t == "Q6_K":
        q = _unpack_q6k(data[:, :128], data[:, 128:192])
        sc = data[:, 192:208].view(torch.int8).to(torch.int32)
        return GgmlBlocks(t, q, _read_half(data[:, 208:210]), sc=sc)
    raise ValueError(f"no GGUF layout for {t}")
