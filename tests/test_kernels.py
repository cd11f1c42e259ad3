"""The fused (compiled) quantize path equals the plain-PyTorch reference bit for bit."""

from __future__ import annotations

import pytest
import torch

from mpqc.formats import FORMATS, kernels
from mpqc.formats.reference import quantize_reference


def bits(t):
    """Bit patterns with NaNs made canonical: a NaN's payload carries no meaning, its place does."""
    t = torch.where(torch.isnan(t), torch.tensor(float("nan"), dtype=t.dtype), t)
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


CASES = [
    # (format, block, rounding, shape, axis, dtype): every family, ragged tails, other axes, halves
    ("mxint4", 32, "nearest", (3, 70, 96), -1, torch.float32),
    ("mxfp4", 32, "even", (96, 130), 0, torch.float32),
    ("mxfp8_e4m3", 64, "nearest", (5, 200), -1, torch.bfloat16),
    ("mxfp6_e3m2", "vector", "nearest", (40, 72), -1, torch.float16),
    ("nvfp4", 16, "nearest", (33, 48), -1, torch.float32),
    ("int4", 128, "even", (16, 300), 1, torch.float32),
]


@pytest.mark.parametrize("name,block,rounding,shape,axis,dtype", CASES)
def test_compiled_equals_reference(monkeypatch, name, block, rounding, shape, axis, dtype):
    monkeypatch.setenv("MPQC_QUANTIZE_BACKEND", "compiled")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * torch.exp2(torch.randint(-8, 8, shape, generator=g).float())).to(dtype)
    x.view(-1)[:5] = torch.tensor([0.0, float("nan"), 2.5, -2.5, 1e-40]).to(dtype)  # specials and a tie
    fmt = FORMATS[name]
    got = kernels.quantize(x, fmt, block, axis % x.dim(), rounding)
    assert torch.equal(bits(got), bits(quantize_reference(x, fmt, block, axis % x.dim(), rounding)))
    # a new shape reuses the compiled entry and stays exact
    y = torch.randn(7, shape[-1], generator=g).to(dtype)
    assert torch.equal(
        bits(kernels.quantize(y, fmt, block, 1, rounding)), bits(quantize_reference(y, fmt, block, 1, rounding))
    )


def test_backend_choice(monkeypatch):
    monkeypatch.setenv("MPQC_QUANTIZE_BACKEND", "fast")
    with pytest.raises(ValueError, match="MPQC_QUANTIZE_BACKEND='fast' is not one of auto, compiled, reference"):
        kernels.backend()
