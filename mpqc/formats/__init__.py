"""Number formats: frozen descriptions, exact fake quantization, and real low-bit packing.

    mpqc.formats.quantize(x, "mxint4", block_size=32, axis=-1, rounding="nearest")
    mpqc.formats.get_format("mxfp4").bits_per_element      # 4.25
    mpqc.formats.pack(x, "mxfp4").unpack()                 # equals quantize(x, "mxfp4")

``quantize`` goes through the ``mpqc::quantize`` torch custom op, so it survives
``torch.export`` as one node carrying the format, block size, axis and rounding.
"""

from __future__ import annotations

import dataclasses

import torch

from . import kernels
from .packing import PackedTensor, code_table, pack_validated
from .spec import (
    BLOCK_KINDS,
    FORMATS,
    ROUNDING_MODES,
    ElementType,
    Format,
    ScaleType,
    get_format,
    validate_block_size,
)

__all__ = [
    "BLOCK_KINDS",
    "FORMATS",
    "ROUNDING_MODES",
    "ElementType",
    "Format",
    "PackedTensor",
    "ScaleType",
    "code_table",
    "get_format",
    "pack",
    "stores_rows_of",
    "quantize",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve(x, fmt, block_size, axis, rounding) -> tuple[Format, object, int]:
    """Check a call's arguments; return the format, the block size in force and the axis (>= 0)."""
    fmt = get_format(fmt)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize takes a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"quantize takes float32, float16 or bfloat16 tensors, got {x.dtype}; "
            "cast integer or float64 data to float32 first (complex data has no quantized form here)"
        )
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"unknown rounding mode {rounding!r}; valid modes: {', '.join(ROUNDING_MODES)}")
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    ndim = max(x.dim(), 1)
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis {axis} is out of range for a tensor with {x.dim()} dimensions (valid: {-ndim} .. {ndim - 1})"
        )
    if fmt.family == "cast":
        if block_size is not None:
            raise ValueError(f"format {fmt.name!r} is a plain cast and takes no block size; pass block_size=None")
        return fmt, None, axis % ndim
    block = fmt.block_size if block_size is None else block_size
    validate_block_size(block)
    fmt.with_block(block)  # raises for combinations a format does not have
    if fmt.family == "ggml":
        check_ggml_call(x, fmt, axis % ndim, rounding)
    return fmt, block, axis % ndim


def stores_rows_of(fmt: Format, length: int) -> bool:
    """Whether ``fmt`` quantizes rows of ``length`` elements: llama.cpp's types take whole blocks
    only (as llama.cpp stores them); mpqc's own formats close a row with a shorter block."""
    return fmt.family != "ggml" or length % fmt.block_size == 0


def check_ggml_call(x, fmt: Format, axis: int, rounding: str) -> None:
    """llama.cpp's types round as ggml's reference does, over whole blocks of a row."""
    if rounding != "nearest":
        raise ValueError(
            f"format {fmt.name!r} rounds as llama.cpp's reference quantizer does; rounding={rounding!r} does not "
            "apply to it (use the default, 'nearest')"
        )
    length = x.shape[axis] if x.dim() else 1
    if not stores_rows_of(fmt, length):
        raise ValueError(
            f"format {fmt.name!r} ({fmt.ggml.type_name}) quantizes rows in blocks of {fmt.block_size}, and this "
            f"tensor's axis {axis} has {length} elements, not a multiple; llama.cpp cannot store it either "
            "(llama-quantize falls back to q5_0 for q4_k, q5_1 for q5_k, q8_0 for q6_k)"
        )


# ---- the custom op ------------------------------------------------------------------------------
# The block size travels as an int: a positive size, or one of these codes.
_BLOCK_CODES = {"vector": -1, "tensor": -2}
_BLOCK_NAMES = {v: k for k, v in _BLOCK_CODES.items()}


def _block_code(block) -> int:
    return _BLOCK_CODES.get(block, block) if block is not None else 0


def _block_from_code(code: int):
    return None if code == 0 else _BLOCK_NAMES.get(code, code)


@torch.library.custom_op("mpqc::quantize", mutates_args=())
def _quantize_op(x: torch.Tensor, fmt: str, block_size: int, axis: int, rounding: str) -> torch.Tensor:
    fmt_obj = FORMATS[fmt]
    block = _block_from_code(block_size)
    x1 = x.reshape(1) if x.dim() == 0 else x
    return kernels.quantize(x1, fmt_obj, block, axis, rounding).reshape(x.shape)


@_quantize_op.register_fake
def _(x, fmt, block_size, axis, rounding):
    return torch.empty_like(x)


def _quantize_backward(ctx, grad):
    # Straight-through estimator: quantization passes gradients unchanged.
    return grad, None, None, None, None


_quantize_op.register_autograd(_quantize_backward)


def quantize(x: torch.Tensor, fmt, *, block_size=None, axis: int = -1, rounding: str = "nearest") -> torch.Tensor:
    """Fake-quantize ``x`` to ``fmt``: the dequantized values, same shape and dtype.

    ``block_size``: a positive int, "vector" (the whole ``axis``) or "tensor"; None takes the
    format's default (32 for MX). Blocks run along ``axis``, the reduction axis of a matmul
    operand. ``rounding``: "nearest" (ties away from zero, the OCP reference's default) or
    "even". Arithmetic is exact in float32; gradients pass straight through.
    """
    fmt, block, axis = resolve(x, fmt, block_size, axis, rounding)
    preset = FORMATS.get(fmt.name)
    if preset is None or preset.with_block(fmt.block_size) != fmt:  # a user-built Format: eager only
        return kernels.quantize(x, fmt, block, axis, rounding)
    return _quantize_op(x, fmt.name, _block_code(block), axis, rounding)


def pack(x: torch.Tensor, fmt, *, block_size=None, axis: int = -1, rounding: str = "nearest") -> PackedTensor:
    """Encode ``x`` into real low-bit codes plus scales; ``.unpack()`` equals ``quantize(x, ...)``."""
    fmt, block, axis = resolve(x, fmt, block_size, axis, rounding)
    packed = pack_validated(x.reshape(1) if x.dim() == 0 else x, fmt, block, axis, rounding)
    return dataclasses.replace(packed, shape=tuple(x.shape))
