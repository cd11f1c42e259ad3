"""The modules that the quantizer-insertion pass puts into a graph.

Their formats are mutable attributes, so switching plans (``QuantizedModel.set_plan``)
changes numbers without touching the graph. Weights are quantized once per
(weight, format, block, rounding) and kept in a cache shared by the whole model; a forward
only reads the cache.
"""

from __future__ import annotations

import torch
from torch import nn

from mpqc.formats import Format, quantize


def _is_identity(fmt: Format | None, dtype: torch.dtype) -> bool:
    return fmt is None or (fmt.family == "cast" and getattr(torch, fmt.cast_dtype) == dtype)


class WeightCache:
    """Quantized copies of weights, one per (weight name, format, rounding), computed on first use."""

    def __init__(self):
        self._store: dict[tuple, torch.Tensor] = {}
        self.computed = 0  # how many quantizations ran: tests check trials never redo one

    def get(self, name: str, weight: torch.Tensor, fmt: Format, axis: int, rounding: str) -> torch.Tensor:
        if _is_identity(fmt, weight.dtype):
            return weight
        key = (name, fmt, axis, rounding)
        cached = self._store.get(key)
        if cached is None:
            with torch.no_grad():
                block = None if fmt.family == "cast" else fmt.block_size
                cached = quantize(weight.detach(), fmt, block_size=block, axis=axis, rounding=rounding)
            self._store[key] = cached
            self.computed += 1
        return cached

    def clear(self) -> None:
        self._store.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._store.values())


class WeightQuantizer(nn.Module):
    """Stands between a weight's get_attr and the matmul: returns the cached quantized weight."""

    def __init__(self, weight_name: str, axis: int, cache: WeightCache):
        super().__init__()
        self.weight_name = weight_name
        self.axis = axis  # the weight's own reduction axis
        self._cache = cache
        self.format: Format | None = None
        self.rounding = "nearest"
        # Kept outside nn.Module's registries: the cached tensor is not a parameter of this module.
        self._selected: dict[str, torch.Tensor] = {}

    def configure(self, fmt: Format, rounding: str, weight: torch.Tensor) -> None:
        self.format, self.rounding = fmt, rounding
        self._selected["weight"] = self._cache.get(self.weight_name, weight, fmt, self.axis, rounding)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # Unconfigured, the graph runs as captured.
        return self._selected.get("weight", weight)

    def extra_repr(self) -> str:
        return f"{self.weight_name}, axis={self.axis}, format={None if self.format is None else self.format.name}"


class ActivationQuantizer(nn.Module):
    """Quantizes one activation for every matmul that reads it along the same axis.

    Returns one tensor per consumer (a tuple); consumers wanting the same format share one
    quantize call, so q/k/v projections reading one input quantize it once."""

    def __init__(self, axis: int, consumers: tuple[str, ...]):
        super().__init__()
        self.axis = axis
        self.consumers = consumers  # matmul names, in slot order
        self.formats: list[Format | None] = [None] * len(consumers)
        self.rounding = "nearest"

    def configure(self, formats: list[Format | None], rounding: str) -> None:
        if len(formats) != len(self.consumers):
            raise ValueError(f"expected {len(self.consumers)} formats, got {len(formats)}")
        self.formats, self.rounding = list(formats), rounding

    def forward(self, x: torch.Tensor):
        done: dict[Format | None, torch.Tensor] = {}
        out = []
        for fmt in self.formats:
            if fmt not in done:
                if _is_identity(fmt, x.dtype):
                    done[fmt] = x
                else:
                    block = None if fmt.family == "cast" else fmt.block_size
                    done[fmt] = quantize(x, fmt, block_size=block, axis=self.axis, rounding=self.rounding)
            out.append(done[fmt])
        return tuple(out)

    def extra_repr(self) -> str:
        names = sorted({"-" if f is None else f.name for f in self.formats})
        return f"axis={self.axis}, consumers={len(self.consumers)}, formats={names}"
