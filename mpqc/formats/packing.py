"""Real low-bit storage: element codes bit-packed into bytes, plus the block scales.

``pack(x, fmt)`` runs the same encode as ``quantize`` and keeps the codes; ``unpack()`` decodes
them through the element's code table and multiplies by the scales, so it equals
``quantize(x, fmt)`` bit for bit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import ggml
from .reference import ENCODERS, Blocking, from_blocks, pow2, to_blocks
from .spec import FORMATS, ElementType, Format


@functools.cache
def code_table(element: ElementType) -> torch.Tensor:
    """float32 value of every code 0 .. 2**bits - 1 (NaN for the codes that are not numbers)."""
    return torch.tensor([element.decode(c) for c in range(2**element.bits)], dtype=torch.float32)


@functools.cache
def _positive_magnitudes(element: ElementType) -> torch.Tensor:
    """Values of the non-negative finite float codes 0, 1, ...: increasing, so searchsorted finds codes."""
    table = code_table(element)[: 2 ** (element.bits - 1)]
    return table[torch.isfinite(table)]


def element_codes(values: torch.Tensor, element: ElementType) -> torch.Tensor:
    """The code of each exact grid value (int32); NaN values get code 0 (their scale is NaN)."""
    nan = torch.isnan(values)
    values = torch.where(nan, 0.0, values)
    if element.kind in ("int", "uint"):
        k = torch.round(values * 2.0**element.frac_bits).to(torch.int32)
        codes = k & (2**element.bits - 1)  # two's complement
    else:
        magnitude = torch.searchsorted(_positive_magnitudes(element), values.abs().contiguous())
        sign = torch.signbit(values).to(torch.int32) << (element.bits - 1)
        codes = magnitude.to(torch.int32) | sign
    return torch.where(nan, 0, codes)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat uint8 bytes holding ``bits``-wide codes, little-endian within each byte
    (4-bit codes two per byte, the first in the low nibble, as ONNX INT4 stores them)."""
    codes = codes.reshape(-1).to(torch.int32)
    if bits == 8:
        return codes.to(torch.uint8)
    if bits == 4:
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_zeros(1)])
        pairs = codes.reshape(-1, 2)
        return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)
    # Any other width: lay the bits out in a stream, eight to a byte.
    shifts = torch.arange(bits, dtype=torch.int32)
    stream = ((codes[:, None] >> shifts) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)])
    return (stream.reshape(-1, 8) << torch.arange(8, dtype=torch.int32)).sum(1).to(torch.uint8)


def unpack_bits(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: ``count`` codes as int64 (for indexing)."""
    data = data.to(torch.int64)
    if bits == 8:
        return data[:count]
    if bits == 4:
        return torch.stack([data & 15, data >> 4], dim=1).reshape(-1)[:count]
    stream = ((data[:, None] >> torch.arange(8)) & 1).reshape(-1)[: count * bits]
    return (stream.reshape(count, bits) << torch.arange(bits)).sum(1)


@dataclass(frozen=True)
class PackedTensor:
    """A tensor stored in its low-bit form.

    ``codes``: uint8 bytes of bit-packed element codes, blocks laid out along ``axis`` moved
    last (zero-padded tail included). ``scales``: one per block, shape (..., n_blocks) in that
    layout: uint8 E8M0 exponents (MX, 255 = NaN), uint8 FP8-E4M3 bits (NVFP4), or float32
    (absmax formats). ``tensor_scale``: NVFP4's float32 tensor scale. Cast formats keep the
    raw bytes of the cast tensor in ``codes`` and no scales. llama.cpp's types (family "ggml")
    keep their GGUF blocks in ``codes``, (rows, block bytes), scales and all, and no ``scales``.
    """

    format: Format
    shape: tuple
    dtype: torch.dtype
    axis: int
    blocking: Blocking | None
    codes: torch.Tensor
    scales: torch.Tensor | None
    tensor_scale: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: codes, scales and tensor scale."""
        total = self.codes.numel() * self.codes.element_size()
        for t in (self.scales, self.tensor_scale):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def ggml_blocks(self) -> ggml.GgmlBlocks:
        """A llama.cpp type's blocks, unpacked from the GGUF bytes in ``codes``."""
        if self.format.family != "ggml":
            raise ValueError(f"format {self.format.name!r} is not one of llama.cpp's block types")
        return ggml.from_bytes(self.format.ggml.type_name, self.codes)

    def element_values(self) -> torch.Tensor:
        """Decoded element values in the blocked layout (..., n_blocks, block), float32."""
        info = self.blocking
        n_codes = self.scales.numel() * info.block
        codes = unpack_bits(self.codes, self.format.element.bits, n_codes)
        return code_table(self.format.element)[codes].reshape(*self.scales.shape, info.block)

    def scale_values(self) -> torch.Tensor:
        """The float32 factor each block's elements are multiplied by, shape (..., n_blocks, 1)."""
        fam = self.format.family
        s = self.scales.unsqueeze(-1)
        if fam == "mx":
            code = s.to(torch.int32)
            return torch.where(code == 255, float("nan"), pow2(code - 127))
        if fam == "nvfp4":
            return s.view(torch.float8_e4m3fn).to(torch.float32) * self.tensor_scale
        return s

    def unpack(self) -> torch.Tensor:
        """The dequantized tensor: equal, bit for bit, to ``quantize`` of the packed input."""
        if self.format.family == "cast":
            return self.codes.view(getattr(torch, self.format.cast_dtype)).reshape(self.shape).to(self.dtype)
        if self.blocking is None:  # empty tensor
            return torch.empty(self.shape, dtype=self.dtype)
        if self.format.family == "ggml":
            n_blocks = self.blocking.padded // self.blocking.block
            values = ggml.decode(self.ggml_blocks()).reshape(*self.blocking.moved_shape[:-1], n_blocks, -1)
            return from_blocks(values, self.blocking).reshape(self.shape).to(self.dtype)
        values = self.element_values() * self.scale_values()
        return from_blocks(values, self.blocking).reshape(self.shape).to(self.dtype)


def pack_validated(x: torch.Tensor, fmt: Format, block_size, axis: int, rounding: str) -> PackedTensor:
    shape = tuple(x.shape)
    if fmt.family == "cast":
        cast = x.detach().to(getattr(torch, fmt.cast_dtype)).contiguous().reshape(-1)
        return PackedTensor(fmt, shape, x.dtype, axis, None, cast.view(torch.uint8), None)
    if x.numel() == 0:
        return PackedTensor(fmt, shape, x.dtype, axis, None, torch.empty(0, dtype=torch.uint8), None)
    blocks, info = to_blocks(x.detach().to(torch.float32), block_size, axis)
    if fmt.family == "ggml":
        data = ggml.to_bytes(ggml.ENCODERS[fmt.ggml.type_name](blocks.reshape(-1, info.block)))
        return PackedTensor(fmt, shape, x.dtype, axis, info, data, None)
    enc = ENCODERS[fmt.family](blocks, fmt.element, rounding)
    codes = pack_bits(element_codes(enc.elements, fmt.element), fmt.element.bits)
    scale_code = enc.scale_code.squeeze(-1)
    scales = scale_code.to(torch.uint8) if fmt.family in ("mx", "nvfp4") else scale_code.to(torch.float32)
    return PackedTensor(fmt.with_block(block_size), shape, x.dtype, axis, info, codes, scales, enc.tensor_scale)


# ---- llama.cpp (GGUF) blocks of any format that has an exact GGUF form ---------------------------

# MX formats whose blocks are exactly one of llama.cpp's: MXFP4 is GGML_TYPE_MXFP4 (OCP MXFP4);
# MXINT8 (k/64 under 2^s) is Q8_0 with d = 2^(s-6), MXINT4 (k/4) is Q4_0 with d = 2^(s-2) and
# codes k + 8, wherever that power of two is an fp16 number.
MX_CONTAINERS = {"mxfp4": ("MXFP4", 0), "mxint8": ("Q8_0", 6), "mxint4": ("Q4_0", 2)}
_FP16_MIN_EXP, _FP16_MAX_EXP = -24, 15


def gguf_type_name(fmt: Format) -> str | None:
    """The GGML type that stores ``fmt`` exactly at its default block, or None."""
    if fmt.family == "ggml":
        return fmt.ggml.type_name if fmt.name != "q8_k" else None
    if fmt.name in MX_CONTAINERS and fmt == FORMATS[fmt.name]:
        return MX_CONTAINERS[fmt.name][0]
    return None


def to_ggml_blocks(x: torch.Tensor, fmt: Format, rounding: str = "nearest") -> ggml.GgmlBlocks:
    """``x`` (rows, n) quantized to ``fmt`` along its last axis, as the GGUF blocks that store it.

    Decoding them (``gguf.quants.dequantize``, llama.cpp) gives ``quantize(x, fmt)`` bit for bit.
    Raises ValueError for a format without an exact GGUF form, or an MX block whose scale is no
    fp16 number."""
    type_name = gguf_type_name(fmt)
    if type_name is None:
        raise ValueError(f"format {fmt.name!r} has no exact GGUF type; {', '.join(GGUF_STORABLE)} do")
    rows = x.detach().to(torch.float32).reshape(-1, fmt.block_size)
    if fmt.family == "ggml":
        return ggml.ENCODERS[type_name](rows)
    enc = ENCODERS["mx"](rows, fmt.element, rounding)
    codes = element_codes(enc.elements, fmt.element)
    finite = enc.scale_code.squeeze(-1) != 255
    if not bool(finite.all()):
        raise ValueError(f"format {fmt.name!r}: a block holds NaN or Inf, which GGUF cannot store")
    if type_name == "MXFP4":
        return ggml.GgmlBlocks(type_name, codes, enc.scale_code.to(torch.float32))
    k = torch.round(enc.elements * 2.0**fmt.element.frac_bits).to(torch.int32)
    exp = enc.scale_code.to(torch.int32) - 127 - MX_CONTAINERS[fmt.name][1]
    used = (k != 0).any(dim=-1, keepdim=True)
    if bool(((exp < _FP16_MIN_EXP) & used).any() | ((exp > _FP16_MAX_EXP) & used).any()):
        raise ValueError(
            f"format {fmt.name!r}: a block scale 2^{int(exp[used].min())} .. 2^{int(exp[used].max())} falls outside "
            f"fp16 (2^{_FP16_MIN_EXP} .. 2^{_FP16_MAX_EXP}), so no exact {type_name} container holds it"
        )
    d = torch.where(used, pow2(exp.clamp(_FP16_MIN_EXP, _FP16_MAX_EXP)), 0.0)
    return ggml.GgmlBlocks(type_name, k + 8 if type_name == "Q4_0" else k, d)


GGUF_STORABLE = tuple(n for n, f in FORMATS.items() if gguf_type_name(f) is not None)
