"""Real low-bit storage: element codes bit-packed into bytes, plus the block scales.

``pack(x, fmt)`` runs the same encode as ``quantize`` and keeps the codes; ``unpack()`` decodes
them through the element's code table and multiplies by the scales, so it equals
``quantize(x, fmt)`` bit for bit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .reference import ENCODERS, Blocking, from_blocks, pow2, to_blocks
from .spec import ElementType, Format


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
    if element.kind == "int":
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
    raw bytes of the cast tensor in ``codes`` and no scales.
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
    enc = ENCODERS[fmt.family](blocks, fmt.element, rounding)
    codes = pack_bits(element_codes(enc.elements, fmt.element), fmt.element.bits)
    scale_code = enc.scale_code.squeeze(-1)
    scales = scale_code.to(torch.uint8) if fmt.family in ("mx", "nvfp4") else scale_code.to(torch.float32)
    return PackedTensor(fmt.with_block(block_size), shape, x.dtype, axis, info, codes, scales, enc.tensor_scale)
