"""Which implementation computes a quantize call: the plain-PyTorch reference, or a fused path.

The reference (``reference.py``) is the definition. The fused path is that same function
compiled by TorchInductor (a C++/OpenMP loop on the CPU, a Triton kernel on CUDA): the block
absmax, the element rounding and the rescale run in one pass over the data. It is tested
against the uncompiled reference bit for bit.

The backend is chosen by ``MPQC_QUANTIZE_BACKEND`` = ``auto`` (default), ``compiled`` or
``reference``. ``auto`` compiles for tensors of at least ``COMPILE_MIN_NUMEL`` elements,
where a one-time compile of a few seconds per (format, block, rounding, dtype) pays off,
and falls back to the reference for good, with a warning, if compiling fails (for instance
on a machine without a C++ compiler).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from .reference import quantize_reference
from .spec import Format

COMPILE_MIN_NUMEL = 1 << 16
_BACKENDS = ("auto", "compiled", "reference")
_compile_failed: str | None = None


def backend() -> str:
    name = os.environ.get("MPQC_QUANTIZE_BACKEND", "auto")
    if name not in _BACKENDS:
        raise ValueError(f"MPQC_QUANTIZE_BACKEND={name!r} is not one of {', '.join(_BACKENDS)}")
    return name


def describe() -> str:
    if _compile_failed:
        return f"reference (compiling failed: {_compile_failed})"
    name = backend()
    if name == "reference":
        return "reference (plain PyTorch)"
    return f"compiled by TorchInductor ({name}; reference below {COMPILE_MIN_NUMEL} elements)" if name == "auto" else "compiled"


def _rows(x2: torch.Tensor, fmt: Format, block_size, rounding: str) -> torch.Tensor:
    return quantize_reference(x2, fmt, block_size, 1, rounding)


@functools.lru_cache(maxsize=None)
def _compiled():
    # One compiled entry per (format, block, rounding, dtype); shapes stay symbolic.
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 64)
    return torch.compile(_rows, dynamic=False)


def quantize_compiled(x: torch.Tensor, fmt: Format, block_size, axis: int, rounding: str) -> torch.Tensor:
    """The compiled path, on ``x`` viewed as (rows, length) along ``axis``."""
    moved = x.movedim(axis, -1)
    x2 = moved.reshape(-1, moved.shape[-1])
    torch._dynamo.mark_dynamic(x2, 0)
    torch._dynamo.mark_dynamic(x2, 1)
    return _compiled()(x2, fmt, block_size, rounding).reshape(moved.shape).movedim(-1, axis)


def quantize(x: torch.Tensor, fmt: Format, block_size, axis: int, rounding: str) -> torch.Tensor:
    global _compile_failed
    name = backend()
    use_compiled = (
        name != "reference"
        and _compile_failed is None
        and fmt.family != "cast"
        and block_size != "tensor"  # one block over everything: nothing to fuse per row
        and x.dim() > 0
        and (name == "compiled" or x.numel() >= COMPILE_MIN_NUMEL)
    )
    if not use_compiled:
        return quantize_reference(x, fmt, block_size, axis, rounding)
    try:
        return quantize_compiled(x, fmt, block_size, axis, rounding)
    except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to the definition
        if name == "compiled":
            raise
        _compile_failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        warnings.warn(f"mpqc: compiling the fused quantize failed ({_compile_failed}); using the reference", stacklevel=2)
        return quantize_reference(x, fmt, block_size, axis, rounding)
