"""Which implementation computes a quantize call: the plain-PyTorch reference, or a fused path.

The reference (``reference.py``) is the definition; every fast path is tested against it bit
for bit.
"""

from __future__ import annotations

import torch

from .reference import quantize_reference
from .spec import Format


def quantize(x: torch.Tensor, fmt: Format, block_size, axis: int, rounding: str) -> torch.Tensor:
    return quantize_reference(x, fmt, block_size, axis, rounding)
