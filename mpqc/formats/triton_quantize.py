"""Fused quantize-dequantize as hand-written Triton kernels: one pass over the data.

Computes exactly what ``reference.quantize_reference`` computes, bit for bit, for every
scaled family (MX with an E8M0 shared exponent, absmax with an fp32 scale, NVFP4 with an
fp32 tensor scale over E4M3 block scales), any element type, any int block size and
"vector" (the whole axis), both roundings, and float32 / float16 / bfloat16 in and out
(arithmetic in float32, as the reference does). "tensor" blocks and plain casts stay on
the reference (``kernels.py`` routes them there).

The input is viewed as (rows, length) with the quantized axis moved last and made
contiguous. Each program of ``_qdq_tile_kernel`` loads ``G`` whole blocks (a [G, BP]
tile, BP = the block size rounded up to a power of two, masked), reduces each block's
absmax, derives its scale, rounds every element onto the element grid and writes the
dequantized tile: one read and one write of the data. A block longer than
``MAX_TILE`` elements (a long "vector" axis) goes to ``_qdq_long_kernel``, one program per
block looping over it twice (absmax, then quantize; the second read mostly hits L2).
NVFP4 needs the tensor's absmax before any block: ``_absmax_bits_kernel`` reads the data
once more for it, and the tensor scale is then computed with torch, as the reference does.

How it stays exact (each point mirrors a line of ``reference.py``):

- Block absmax is an integer max of the abs bit patterns (``bits & 0x7fffffff``): for
  non-negative floats integer order is float order, and NaN > Inf > finite, so a block
  holding NaN or Inf is recognised without relying on a float max's NaN semantics.
  The masked tail loads +0.0, as the reference's zero padding does.
- Powers of two are built from bits (``_pow2``, ``_pow2_normal``), exponents read from
  bits (``floor_log2``), never a float log2.
- Dividing by a power of two is done as a multiplication by its exact reciprocal
  (identical to IEEE division: both round the same real number once). Other divisions use
  ``tl.math.div_rn`` (IEEE round-to-nearest): Triton's plain ``/`` on float32 lowers to an
  approximate division on CUDA.
- Rounding: "nearest" is ``floor(t + 0.5)`` in float32 (the reference's own formula,
  including its rounding of the addition); "even" is ``(t + 2**23) - 2**23``, exact round
  half to even for 0 <= t < 2**23 (t here is below 2**17). Every product feeding an
  addition is exact, so a fused multiply-add gives the same result as separate ops.
- E4M3 block scales (NVFP4) are rounded by the same grid rounding, half to even, after
  the reference's clamp to 448, as torch's float8_e4m3fn cast does.
- bfloat16 is loaded and stored through its bits (round half to even, NaN kept), so the
  interpreter, whose bfloat16 casts are not exact, runs the same code as the GPU.

Tested bit for bit against the reference in Triton's interpreter (``tests/test_triton.py``,
TRITON_INTERPRET=1 on CPU tensors) and, where CUDA exists, on the GPU.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .reference import NVFP4_ELEMENT_MAX, NVFP4_SCALE_MAX
from .spec import ElementType, Format

TILE_BYTES = 16384  # input bytes per program (several blocks): 4096 float32 or 8192 16-bit elements
MAX_TILE = 16384  # blocks longer than this (elements) loop inside one program per block
LONG_CHUNK = 4096  # chunk of that loop
AMAX_TILE = 8192  # elements per program of the NVFP4 tensor-absmax pass

_FAMILY = {"mx": 0, "absmax": 1, "nvfp4": 2}
_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# ---- exact helpers ----------------------------------------------------------------------------


@triton.jit
def _pow2(e):
    """2**e exactly in float32 for int32 e in [-149, 127] (reference.pow2)."""
    normal = (tl.minimum(tl.maximum(e + 127, 1), 254) << 23).to(tl.float32, bitcast=True)
    sub = (tl.full(e.shape, 1, tl.int32) << tl.minimum(tl.maximum(e + 149, 0), 22)).to(tl.float32, bitcast=True)
    return tl.where(e >= -126, normal, sub)


@triton.jit
def _pow2_normal(e):
    """2**e for int32 e in [-126, 127]: the element grid steps and their reciprocals,
    which never leave the normal range (see ``_round_element``)."""
    return (tl.minimum(tl.maximum(e + 127, 1), 254) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _round_half(t, EVEN: tl.constexpr):
    """Round non-negative float32 t (< 2**23) to an integer: ties away or ties to even."""
    if EVEN:
        return (t + 8388608.0) - 8388608.0
    else:
        return tl.floor(t + 0.5)


@triton.jit
def _round_element(
    v,
    EVEN: tl.constexpr,
    IS_INT: tl.constexpr,
    MAN: tl.constexpr,
    EMIN: tl.constexpr,
    MAXN: tl.constexpr,
    UNIT: tl.constexpr,
    QMAX: tl.constexpr,
):
    """reference.quantize_element for finite float32 v (already divided by its scale).

    Float elements: the step 2**(exponent - MAN) with exponent >= EMIN >= -14, and its
    reciprocal 2**(MAN - exponent) where exponent <= floor_log2(|v|) < 128 - MAN for every
    v the families produce (|v| < 2**17 for MX and absmax, < 2**110 for NVFP4), so both are
    normal and ``|v| * (1/step)`` equals the reference's ``|v| / step`` exactly."""
    vb = v.to(tl.int32, bitcast=True)
    ab = vb & 0x7FFFFFFF
    a = ab.to(tl.float32, bitcast=True)
    sign = vb & -2147483648  # 0x80000000
    if IS_INT:
        k = tl.minimum(_round_half(a * UNIT, EVEN), QMAX)
        mag = k * (1.0 / UNIT)
        # copysign(k / unit, v) + 0.0: a zero is +0 (two's-complement codes have no -0)
        out = tl.where(k == 0.0, 0.0, (mag.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True))
    else:
        ex = tl.maximum(((ab >> 23) & 0xFF) - 127, EMIN)  # subnormals share the smallest exponent
        r = _round_half(a * _pow2_normal(MAN - ex), EVEN) * _pow2_normal(ex - MAN)
        r = tl.minimum(r, MAXN)  # saturate (r is never NaN here: v is finite)
        out = (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return out


@triton.jit
def _e4m3_rne(w):
    """float32 w in [0, 448] rounded to FP8 E4M3 (round half to even, subnormals from
    2**-9), returned as float32: torch's ``w.to(float8_e4m3fn).float()`` there."""
    wb = w.to(tl.int32, bitcast=True)
    ex = tl.maximum(((wb >> 23) & 0xFF) - 127, -6)
    return _round_half(w * _pow2_normal(3 - ex), True) * _pow2_normal(ex - 3)


@triton.jit
def _block_scales(amax_bits, ts, FAMILY: tl.constexpr, EMAX: tl.constexpr, MAXN: tl.constexpr):
    """Per-block (divisor-or-reciprocal, scale, bad) from the block absmax bits.

    MX returns the exact reciprocal of the power-of-two scale (the elements are
    x * it); absmax and NVFP4 return the divisor ``safe`` (elements are div_rn(x, safe)).
    ``bad`` marks blocks whose whole output is NaN."""
    amax = amax_bits.to(tl.float32, bitcast=True)
    bad = amax_bits >= 0x7F800000  # the block holds Inf or NaN
    if FAMILY == 0:  # mx: E8M0 shared exponent
        e = tl.where(amax_bits > 0, ((amax_bits >> 23) & 0xFF) - 127, -126)
        shared = tl.minimum(tl.maximum(e - EMAX, -127), 127)
        return _pow2(-shared), _pow2(shared), bad
    elif FAMILY == 1:  # absmax: fp32 scale = amax / element max
        scale = tl.math.div_rn(amax, MAXN)
        safe = tl.where(scale == 0.0, 1.0, scale)
        return safe, scale, bad
    else:  # nvfp4: E4M3 block scale under the fp32 tensor scale ts
        denom = ts * 6.0  # NVFP4_ELEMENT_MAX * tensor_scale
        wanted = tl.math.div_rn(amax, denom)
        wanted = tl.where(wanted > 448.0, 448.0, wanted)  # clamp(max=NVFP4_SCALE_MAX)
        scale = _e4m3_rne(wanted) * ts
        safe = tl.where(scale == 0.0, 1.0, scale)
        # an Inf or NaN anywhere makes the tensor scale, so every block, NaN
        bad = tl.maximum(amax_bits, ts.to(tl.int32, bitcast=True) & 0x7FFFFFFF) >= 0x7F800000
        return safe, scale, bad


@triton.jit
def _apply(x, s, FAMILY: tl.constexpr):
    if FAMILY == 0:
        return x * s  # exact: s is the power-of-two reciprocal of the scale
    else:
        return tl.math.div_rn(x, s)


@triton.jit
def _load_f32(ptr, offs, mask, DTYPE: tl.constexpr):
    if DTYPE == 2:  # bfloat16 passed as int16 bits: widen exactly
        raw = tl.load(ptr + offs, mask=mask, other=0)
        return (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_f32(ptr, offs, y, mask, DTYPE: tl.constexpr):
    if DTYPE == 2:  # round half to even to bfloat16 bits (reference.round_to_dtype), NaN kept
        i = y.to(tl.int32, bitcast=True)
        r = (i + ((i >> 16) & 1) + 0x7FFF) >> 16
        r = tl.where(y != y, 0x7FC0, r)
        tl.store(ptr + offs, r.to(tl.int16), mask=mask)
    elif DTYPE == 1:
        tl.store(ptr + offs, y.to(tl.float16), mask=mask)
    else:
        tl.store(ptr + offs, y, mask=mask)


# ---- kernels -----------------------------------------------------------------------------------


@triton.jit
def _qdq_tile_kernel(
    x_ptr,
    y_ptr,
    ts_ptr,
    n_blocks,
    length,
    blocks_per_row,
    block,
    BP: tl.constexpr,
    G: tl.constexpr,
    CONTIG: tl.constexpr,
    INT64: tl.constexpr,
    FAMILY: tl.constexpr,
    DTYPE: tl.constexpr,
    EVEN: tl.constexpr,
    IS_INT: tl.constexpr,
    MAN: tl.constexpr,
    EMIN: tl.constexpr,
    EMAX: tl.constexpr,
    MAXN: tl.constexpr,
    UNIT: tl.constexpr,
    QMAX: tl.constexpr,
):
    """G whole blocks per program, each padded to BP lanes: [G, BP] tile, one pass."""
    b = tl.program_id(0) * G + tl.arange(0, G)
    if INT64:
        b = b.to(tl.int64)
    k = tl.arange(0, BP)[None, :]
    if CONTIG:  # block == BP and length % block == 0: the tile is one contiguous run
        offs = b[:, None] * BP + k
        mask = (b < n_blocks)[:, None] & (k < BP)
    else:
        row = b // blocks_per_row
        col = (b - row * blocks_per_row)[:, None] * block + k
        mask = (b < n_blocks)[:, None] & (k < block) & (col < length)
        offs = row[:, None] * length + col
    x = _load_f32(x_ptr, offs, mask, DTYPE)
    amax_bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
    ts = 1.0
    if FAMILY == 2:
        ts = tl.load(ts_ptr)
    s, scale, bad = _block_scales(amax_bits, ts, FAMILY, EMAX, MAXN)
    v = _apply(x, s[:, None], FAMILY)
    y = _round_element(v, EVEN, IS_INT, MAN, EMIN, MAXN, UNIT, QMAX) * scale[:, None]
    y = tl.where(bad[:, None], float("nan"), y)
    _store_f32(y_ptr, offs, y, mask, DTYPE)


@triton.jit
def _qdq_long_kernel(
    x_ptr,
    y_ptr,
    ts_ptr,
    length,
    blocks_per_row,
    block,
    CH: tl.constexpr,
    NCHUNK: tl.constexpr,
    INT64: tl.constexpr,
    FAMILY: tl.constexpr,
    DTYPE: tl.constexpr,
    EVEN: tl.constexpr,
    IS_INT: tl.constexpr,
    MAN: tl.constexpr,
    EMIN: tl.constexpr,
    EMAX: tl.constexpr,
    MAXN: tl.constexpr,
    UNIT: tl.constexpr,
    QMAX: tl.constexpr,
):
    """One program per (long) block: absmax over chunks, then quantize the chunks.

    The chunk count is a compile-time constant (one compile per count, not per length):
    a runtime loop bound derived from an argument fails in older Triton interpreters."""
    b = tl.program_id(0)
    if INT64:
        b = b.to(tl.int64)
    row = b // blocks_per_row
    start = (b - row * blocks_per_row) * block
    base = row * length + start
    end = tl.minimum(block, length - start)  # elements of this block inside the row
    k = tl.arange(0, CH)
    acc = tl.zeros([CH], tl.int32)
    for c in range(0, NCHUNK * CH, CH):  # a ragged last block masks its missing tail
        mask = (c + k) < end
        x = _load_f32(x_ptr, base + c + k, mask, DTYPE)
        acc = tl.maximum(acc, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
    amax_bits = tl.max(acc, axis=0)
    ts = 1.0
    if FAMILY == 2:
        ts = tl.load(ts_ptr)
    s, scale, bad = _block_scales(amax_bits, ts, FAMILY, EMAX, MAXN)
    for c in range(0, NCHUNK * CH, CH):  # a ragged last block masks its missing tail
        mask = (c + k) < end
        x = _load_f32(x_ptr, base + c + k, mask, DTYPE)
        y = _round_element(_apply(x, s, FAMILY), EVEN, IS_INT, MAN, EMIN, MAXN, UNIT, QMAX) * scale
        y = tl.where(bad, float("nan"), y)
        _store_f32(y_ptr, base + c + k, y, mask, DTYPE)


@triton.jit
def _absmax_bits_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, INT64: tl.constexpr, DTYPE: tl.constexpr):
    """Per-program max of the abs bit patterns (NaN > Inf > finite), for NVFP4's tensor amax."""
    start = tl.program_id(0)
    if INT64:
        start = start.to(tl.int64)
    offs = start * BLOCK + tl.arange(0, BLOCK)
    x = _load_f32(x_ptr, offs, offs < n, DTYPE)
    tl.store(out_ptr + tl.program_id(0), tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=0))


# ---- the launcher --------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _element_constants(element: ElementType) -> dict:
    if element.kind == "int":
        return dict(
            IS_INT=True,
            MAN=0,
            EMIN=0,
            MAXN=float(element.max_normal),
            UNIT=float(2.0**element.frac_bits),
            QMAX=float(element.qmax),
        )
    return dict(
        IS_INT=False, MAN=element.man_bits, EMIN=element.emin, MAXN=float(element.max_normal), UNIT=1.0, QMAX=0.0
    )


def supports(fmt: Format, block_size) -> bool:
    """Whether these kernels compute this call (the rest stays on the reference)."""
    return fmt.family in _FAMILY and block_size != "tensor"


def _kernel_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _tensor_scale(x2: torch.Tensor, int64: bool) -> torch.Tensor:
    """NVFP4's fp32 tensor scale, as encode_nvfp4 computes it (a 1-element tensor)."""
    n = x2.numel()
    grid = triton.cdiv(n, AMAX_TILE)
    partial = torch.empty(grid, dtype=torch.int32, device=x2.device)
    _absmax_bits_kernel[(grid,)](
        _kernel_view(x2), partial, n, BLOCK=AMAX_TILE, INT64=int64, DTYPE=_DTYPE[x2.dtype], num_warps=8
    )
    tensor_amax = partial.max().view(torch.float32)
    tensor_scale = tensor_amax / (NVFP4_ELEMENT_MAX * NVFP4_SCALE_MAX)
    return torch.where(tensor_scale == 0, 1.0, tensor_scale).reshape(1)


def quantize_triton(
    x: torch.Tensor,
    fmt: Format,
    block_size,
    axis: int,
    rounding: str,
    *,
    blocks_per_program: int | None = None,
    num_warps: int | None = None,
    index64: bool | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` (an already validated call) with the Triton kernels.

    ``blocks_per_program`` and ``num_warps`` override the tile heuristic (for tuning);
    ``index64`` forces 64-bit (True) or 32-bit offsets instead of choosing by size (tests)."""
    if not supports(fmt, block_size):
        raise ValueError(
            f"the Triton kernels do not compute format {fmt.name!r} with block {block_size!r}; "
            "plain casts and 'tensor' blocks run on the reference"
        )
    if x.dtype not in _DTYPE:
        raise TypeError(f"the Triton kernels take float32, float16 or bfloat16, got {x.dtype}")
    if x.numel() == 0:
        return x.clone()
    if x.dim() == 0:
        return quantize_triton(x.reshape(1), fmt, block_size, 0, rounding).reshape(())
    moved = x.movedim(axis, -1)
    length = moved.shape[-1]
    x2 = moved.reshape(-1, length).contiguous()
    rows = x2.shape[0]
    y2 = torch.empty_like(x2)
    block = length if block_size == "vector" else int(block_size)
    blocks_per_row = -(-length // block)
    n_blocks = rows * blocks_per_row
    bp = _next_pow2(block)
    consts = dict(
        FAMILY=_FAMILY[fmt.family],
        DTYPE=_DTYPE[x.dtype],
        EVEN=rounding == "even",
        EMAX=fmt.element.emax if fmt.family == "mx" else 0,
        **_element_constants(fmt.element),
    )
    tile = TILE_BYTES // x.element_size()
    span = (n_blocks + tile) * max(bp, block) + length  # above any offset a program forms
    int64 = span >= 2**31 - 1 if index64 is None else bool(index64)
    # Triton launches on the current CUDA device: make it the tensor's
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _launch(
            x2, y2, fmt, length, block, blocks_per_row, n_blocks, bp, tile, int64, consts, blocks_per_program, num_warps
        )
    return y2.reshape(moved.shape).movedim(-1, axis)


def _launch(
    x2, y2, fmt, length, block, blocks_per_row, n_blocks, bp, tile, int64, consts, blocks_per_program, num_warps
) -> None:
    ts = _tensor_scale(x2, int64) if fmt.family == "nvfp4" else y2  # unused pointer otherwise
    xk, yk = _kernel_view(x2), _kernel_view(y2)
    if bp <= MAX_TILE:
        g = _next_pow2(blocks_per_program or max(1, tile // bp))
        warps = num_warps or max(4, min(16, g * bp * x2.element_size() // 2048))
        grid = (triton.cdiv(n_blocks, g),)
        _qdq_tile_kernel[grid](
            xk,
            yk,
            ts,
            n_blocks,
            length,
            blocks_per_row,
            block,
            BP=bp,
            G=g,
            CONTIG=(bp == block and length % block == 0),
            INT64=int64,
            num_warps=warps,
            **consts,
        )
    else:
        _qdq_long_kernel[(n_blocks,)](
            xk,
            yk,
            ts,
            length,
            blocks_per_row,
            block,
            CH=LONG_CHUNK,
            NCHUNK=triton.cdiv(block, LONG_CHUNK),
            INT64=int64,
            num_warps=num_warps or 8,
            **consts,
        )
