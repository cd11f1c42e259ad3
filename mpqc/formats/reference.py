"""The reference arithmetic of every format, in plain PyTorch, exact in float32.

Each scaled format is computed as ``encode`` (block scales and element values) followed by
``decode`` (element value times scale). ``quantize`` is decode(encode(x)); ``pack`` stores
the codes of the same encode, so unpacking equals quantizing bit for bit by construction.

MX semantics follow the OCP MX v1.0 public reference emulation: shared exponent
floor(log2(max|x|)) - emax(element), clamped to the E8M0 range [-127, 127] (an all-zero
block uses log2 of the smallest fp32 normal), elements saturate to the element's max normal
with that element type's subnormals, and a block holding NaN or Inf becomes NaN. Where that
emulation takes floor(log2(.)) through a float log2, here the exponent is read exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ggml
from .spec import ElementType, Format

# ---- exact power-of-two helpers -----------------------------------------------------------


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) as int32 for finite normal float32 a > 0, read from the exponent bits.

    Zero and fp32 subnormals give -127. Every caller clamps the result at or above -127
    (shared exponents) or at the element's smallest normal exponent, so this is exact where
    it is used, and it compiles to plain integer ops."""
    return ((a.view(torch.int32) >> 23) & 0xFF) - 127


def pow2(e: torch.Tensor) -> torch.Tensor:
    """2**e exactly in float32 for int32 e in [-149, 127], built from its bits."""
    e = e.to(torch.int32)
    normal = ((e + 127).clamp(min=1, max=254) << 23).view(torch.float32)
    subnormal = (torch.ones_like(e) << (e + 149).clamp(min=0, max=22)).view(torch.float32)
    return torch.where(e >= -126, normal, subnormal)


def round_half(r: torch.Tensor, rounding: str) -> torch.Tensor:
    """Round non-negative r to an integer: "nearest" ties away from zero, "even" ties to even.

    floor(r + 0.5) is exact in float32 for r < 2**22, far above any element grid here."""
    if rounding == "nearest":
        return torch.floor(r + 0.5)
    return torch.round(r)  # round-half-to-even


def round_to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype).to(x.dtype)``, bit for bit, from integer and power-of-two float32 ops.

    TorchInductor drops a downcast that is followed by an upcast (unless its
    ``emulate_precision_casts`` is set), so the plain round trip does not round at all in a
    compiled graph. This form does: round half to even, overflow to +-inf, NaN kept."""
    if dtype == x.dtype or (dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        return x
    y = x.to(torch.float32)
    if dtype == torch.bfloat16:  # same exponent range as float32: round the low 16 bits away
        i = y.view(torch.int32)
        r = ((i + ((i >> 16) & 1) + 0x7FFF) & -65536).view(torch.float32)
    elif dtype == torch.float16:  # 10 fraction bits, normal exponents -14 .. 15
        step = pow2(floor_log2(y.abs()).clamp(min=-14, max=15) - 10)
        r = torch.round(y / step) * step
        r = torch.where(r.abs() > 65504.0, torch.copysign(torch.full_like(r, float("inf")), y), r)
    else:
        raise ValueError(f"no exact rounding to {dtype} here; casts go to float32, float16 or bfloat16")
    return torch.where(torch.isnan(y), y, r).to(x.dtype)


# ---- element conversion ---------------------------------------------------------------------


def quantize_element(v: torch.Tensor, element: ElementType, rounding: str) -> torch.Tensor:
    """Round float32 ``v`` (already divided by its scale) onto the element grid, saturating."""
    a = v.abs()
    if element.kind == "int":
        unit = 2.0**element.frac_bits
        k = round_half(a * unit, rounding).clamp(max=element.qmax)
        # +0.0 turns -0 into +0: two's-complement codes have no negative zero.
        return torch.copysign(k / unit, v) + 0.0
    exponent = floor_log2(a).clamp(min=element.emin)  # subnormals share the smallest exponent
    step = pow2(exponent - element.man_bits)
    r = round_half(a / step, rounding) * step
    return torch.copysign(r.clamp(max=element.max_normal), v)


# ---- blocking -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blocking:
    """How a tensor was cut into blocks along ``axis`` (moved last), and how to undo it."""

    moved_shape: tuple  # shape after moving the axis last
    axis: int
    length: int  # size of the blocked axis (or numel for "tensor")
    block: int  # elements per block
    per_tensor: bool

    @property
    def padded(self) -> int:
        return -(-self.length // self.block) * self.block if self.length else 0


def to_blocks(x: torch.Tensor, block_size, axis: int) -> tuple[torch.Tensor, Blocking]:
    """View ``x`` as (..., n_blocks, block), the last block zero-padded."""
    if block_size == "tensor":
        flat = x.reshape(1, 1, -1)
        n = flat.shape[-1]
        return flat, Blocking(tuple(x.shape), axis, n, max(n, 1), True)
    moved = x.movedim(axis, -1)
    length = moved.shape[-1]
    block = max(length, 1) if block_size == "vector" else int(block_size)
    info = Blocking(tuple(moved.shape), axis, length, block, False)
    pad = info.padded - length
    if pad:
        moved = torch.nn.functional.pad(moved, (0, pad))
    return moved.reshape(*moved.shape[:-1], -1, block), info


def from_blocks(blocks: torch.Tensor, info: Blocking) -> torch.Tensor:
    if info.per_tensor:
        return blocks.reshape(info.moved_shape)
    flat = blocks.reshape(*info.moved_shape[:-1], -1)[..., : info.length]
    return flat.movedim(-1, info.axis)


# ---- encode / decode per family -------------------------------------------------------------


@dataclass
class Encoded:
    """Element values on the grid, per-block scales (broadcastable), and the stored scale codes."""

    elements: torch.Tensor  # (..., n_blocks, block) float32, exact grid values
    scale: torch.Tensor  # (..., n_blocks, 1) float32: what elements are multiplied by
    scale_code: torch.Tensor  # (..., n_blocks, 1): int32 shared exponent (mx), fp8 bits (nvfp4), fp32 (absmax)
    tensor_scale: torch.Tensor | None = None  # () float32, nvfp4 only


def encode_mx(blocks: torch.Tensor, element: ElementType, rounding: str) -> Encoded:
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    finite = torch.isfinite(amax)
    # An all-zero block takes log2 of the smallest fp32 normal (-126), as the reference does.
    e = torch.where(amax > 0, floor_log2(torch.where(finite, amax, 1.0)), -126)
    shared = e - element.emax
    valid = finite & (shared <= 127)  # above the E8M0 range is NaN; below clamps
    shared = shared.clamp(min=-127, max=127)
    scale = torch.where(valid, pow2(shared), float("nan"))
    elements = quantize_element(blocks / scale, element, rounding)
    code = torch.where(valid, shared + 127, 255).to(torch.int32)  # E8M0: 255 is NaN
    return Encoded(elements, scale, code)


def encode_absmax(blocks: torch.Tensor, element: ElementType, rounding: str) -> Encoded:
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(torch.isfinite(amax), amax / element.max_normal, float("nan"))
    safe = torch.where(scale == 0, 1.0, scale)  # an all-zero block stays zero
    elements = quantize_element(blocks / safe, element, rounding)
    return Encoded(elements, scale, scale)


NVFP4_ELEMENT_MAX = 6.0
NVFP4_SCALE_MAX = 448.0


def encode_nvfp4(blocks: torch.Tensor, element: ElementType, rounding: str) -> Encoded:
    # Two-level scaling: fp32 tensor scale so that block scales fit E4M3, then E4M3 per block.
    tensor_amax = blocks.abs().amax()
    tensor_scale = tensor_amax / (NVFP4_ELEMENT_MAX * NVFP4_SCALE_MAX)
    tensor_scale = torch.where(tensor_scale == 0, 1.0, tensor_scale)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    wanted = (amax / (NVFP4_ELEMENT_MAX * tensor_scale)).clamp(max=NVFP4_SCALE_MAX)
    block_fp8 = wanted.to(torch.float8_e4m3fn)  # round to nearest even, NaN stays NaN
    scale = block_fp8.to(torch.float32) * tensor_scale
    safe = torch.where(scale == 0, 1.0, scale)
    elements = quantize_element(blocks / safe, element, rounding)
    return Encoded(elements, scale, block_fp8.view(torch.uint8).to(torch.int32), tensor_scale)


ENCODERS = {"mx": encode_mx, "absmax": encode_absmax, "nvfp4": encode_nvfp4}


def decode(elements: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return elements * scale


# ---- the whole quantize-dequantize ------------------------------------------------------------


def quantize_reference(x: torch.Tensor, fmt: Format, block_size, axis: int, rounding: str) -> torch.Tensor:
    """Fake quantization of an already validated call: same shape and dtype as ``x``."""
    if fmt.family == "cast":
        return x.to(getattr(torch, fmt.cast_dtype), copy=True).to(x.dtype)
    if x.numel() == 0:
        return x.clone()
    blocks, info = to_blocks(x.to(torch.float32), block_size, axis)
    if fmt.family == "ggml":
        values = ggml.decode(ggml.ENCODERS[fmt.ggml.type_name](blocks.reshape(-1, info.block)))
        return from_blocks(values.reshape(blocks.shape), info).to(x.dtype)
    enc = ENCODERS[fmt.family](blocks, fmt.element, rounding)
    return from_blocks(decode(enc.elements, enc.scale), info).to(x.dtype)
