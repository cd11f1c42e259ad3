"""Which implementation computes a quantize call: the plain-PyTorch reference, or a fused path.

The reference (``reference.py``) is the definition. Two fused paths compute it in one pass
over the data (block absmax, element rounding and rescale together), both tested against
the uncompiled reference bit for bit:

- on CUDA, hand-written Triton kernels (``triton_quantize.py``), when triton imports;
- otherwise the reference compiled by TorchInductor (a C++/OpenMP loop on the CPU).

The backend is chosen by ``MPQC_QUANTIZE_BACKEND`` = ``auto`` (default), ``compiled``,
``triton`` or ``reference``. ``auto`` runs the Triton kernels on CUDA tensors (any size;
triton compiles once per format, block kind, rounding and dtype) and otherwise compiles
for tensors of at least ``COMPILE_MIN_NUMEL`` elements, where a one-time compile of a few
seconds per (format, block, rounding, dtype) pays off. Under ``auto`` a fused path that
fails falls back for good, with a warning (the Triton kernels to the compiled path, the
compiled path to the reference; for instance on a machine without a C++ compiler).
``triton`` forces the kernels and raises where they cannot run (no triton, a CPU tensor);
with ``TRITON_INTERPRET=1`` as well it runs them in Triton's interpreter on CPU tensors (slow:
for tests and debugging without a GPU). ``compiled`` forces TorchInductor. Plain casts and
``"tensor"`` blocks always run the reference: a single block over everything leaves nothing
to fuse per row.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from .reference import quantize_reference
from .spec import Format

COMPILE_MIN_NUMEL = 1 << 16
_BACKENDS = ("auto", "compiled", "reference", "triton")
_compile_failed: str | None = None
_triton_failed: str | None = None


def backend() -> str:
    name = os.environ.get("MPQC_QUANTIZE_BACKEND", "auto")
    if name not in _BACKENDS:
        raise ValueError(f"MPQC_QUANTIZE_BACKEND={name!r} is not one of {', '.join(_BACKENDS)}")
    return name


@functools.cache
def _triton_module():
    """``triton_quantize`` if triton imports, else why not (a str)."""
    try:
        from . import triton_quantize
    except Exception as exc:  # noqa: BLE001 - triton is optional (CPU-only installs have none), or broken
        return f"{type(exc).__name__}: {exc}"
    return triton_quantize


def interpreting() -> bool:
    """Triton's interpreter is on: its kernels take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    return not isinstance(_triton_module(), str)


def describe() -> str:
    name = backend()
    if name == "reference":
        return "reference (plain PyTorch)"
    if name == "triton":
        return (
            "Triton kernels (forced; interpreted, on CPU tensors)"
            if interpreting()
            else "Triton kernels (forced; CUDA tensors only)"
        )
    if name == "compiled":
        return "compiled"
    cpu = (
        f"reference (compiling failed: {_compile_failed})"
        if _compile_failed
        else f"compiled by TorchInductor (auto; reference below {COMPILE_MIN_NUMEL} elements)"
    )
    if _triton_failed:
        gpu = f"CUDA: Triton kernels failed ({_triton_failed}), so as elsewhere"
    elif triton_available():
        gpu = "CUDA: Triton kernels"
    else:
        gpu = "CUDA: as elsewhere (triton does not import)"
    return f"{cpu}; {gpu}"


def _rows(x2: torch.Tensor, fmt: Format, block_size, rounding: str) -> torch.Tensor:
    return quantize_reference(x2, fmt, block_size, 1, rounding)


@functools.cache
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


def _fusable(x: torch.Tensor, fmt: Format, block_size) -> bool:
    # a cast has nothing to fuse; one block over everything: nothing to fuse per row; llama.cpp's
    # types follow ggml's reference step by step (sums element by element), which stays eager
    return fmt.family not in ("cast", "ggml") and block_size != "tensor" and x.dim() > 0


def quantize_with_triton(x: torch.Tensor, fmt: Format, block_size, axis: int, rounding: str) -> torch.Tensor:
    """The Triton kernels, or a clear error where they cannot run."""
    module = _triton_module()
    if isinstance(module, str):
        raise RuntimeError(
            f"MPQC_QUANTIZE_BACKEND=triton, but triton does not import ({module}); "
            "install triton or pick auto, compiled or reference"
        )
    if not x.is_cuda and not interpreting():
        raise RuntimeError(
            f"MPQC_QUANTIZE_BACKEND=triton runs on CUDA tensors only, got a {x.device} tensor; "
            "pick auto, compiled or reference here (or set TRITON_INTERPRET=1 as well to run "
            "the kernels in Triton's interpreter, slowly)"
        )
    return module.quantize_triton(x, fmt, block_size, axis, rounding)


def quantize(x: torch.Tensor, fmt: Format, block_size, axis: int, rounding: str) -> torch.Tensor:
    global _compile_failed, _triton_failed
    name = backend()
    if name == "triton" and _fusable(x, fmt, block_size):
        return quantize_with_triton(x, fmt, block_size, axis, rounding)
    if name == "auto" and x.is_cuda and _triton_failed is None and _fusable(x, fmt, block_size) and triton_available():
        try:
            return quantize_with_triton(x, fmt, block_size, axis, rounding)
        except Exception as exc:  # noqa: BLE001 - a kernel that fails to build falls back to the other paths
            _triton_failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            warnings.warn(
                f"mpqc: the Triton quantize kernels failed ({_triton_failed}); using the other paths", stacklevel=2
            )
    use_compiled = (
        name in ("auto", "compiled")
        and _compile_failed is None
        and _fusable(x, fmt, block_size)
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
        warnings.warn(
            f"mpqc: compiling the fused quantize failed ({_compile_failed}); using the reference", stacklevel=2
        )
        return quantize_reference(x, fmt, block_size, axis, rounding)
