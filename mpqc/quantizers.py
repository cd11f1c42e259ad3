"""The modules that the quantizer-insertion pass puts into a graph.

Their formats are mutable attributes, so switching plans (``QuantizedModel.set_plan``)
changes numbers without touching the graph. Weights are quantized once per
(weight, format, block, rounding) and kept in a cache shared by the whole model; a forward
only reads the cache.

Under ``torch.compile`` a plan switch must not change anything dynamo guards on, or every
plan would be a recompile (and past dynamo's recompile limit, a silent fall back to eager).
So what a compiled forward reads is tensors, not Python values: the selected weight is a
tensor that set_plan swaps, and each activation slot picks its format by an index tensor
into ``candidates``, the formats the model has been asked for so far. Only a format never
seen before changes ``candidates`` and costs one recompile.
"""

from __future__ import annotations

import torch
from torch import nn

from mpqc.formats import Format, quantize
from mpqc.formats.reference import quantize_reference, round_to_dtype


def _is_identity(fmt: Format | None, dtype: torch.dtype) -> bool:
    return fmt is None or (fmt.family == "cast" and getattr(torch, fmt.cast_dtype) == dtype)


class WeightCache:
    """Quantized copies of weights, one per (weight name, format, rounding), computed on first use."""

    def __init__(self):
        self._store: dict[tuple, torch.Tensor] = {}
        self.computed = 0  # how many quantizations ran: tests check trials never redo one

    def get(self, name: str, weight: torch.Tensor, fmt: Format, axis: int, rounding: str) -> torch.Tensor:
        if _is_identity(fmt, weight.dtype):
            # A new tensor object on the same storage: were it the parameter itself, a
            # compiled forward would guard on that identity and recompile when it changes.
            return weight.detach()
        key = (name, fmt, axis, rounding)
        cached = self._store.get(key)
        if cached is None:
            with torch.no_grad():
                block = None if fmt.family == "cast" else fmt.block_size
                q = quantize(weight.detach(), fmt, block_size=block, axis=axis, rounding=rounding)
                # A fresh tensor laid out like the weight, not a view of the kernel's blocks:
                # torch.compile guards on layouts, so every candidate must look the same.
                cached = torch.empty_like(weight, requires_grad=False).copy_(q)
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

    def __init__(self, axis: int, consumers: tuple[str, ...], device: torch.device | str = "cpu"):
        super().__init__()
        self.axis = axis
        self.consumers = consumers  # matmul names, in slot order
        self.formats: list[Format | None] = [None] * len(consumers)
        self.rounding = "nearest"
        # The compiled forward's view of ``formats``: slot i uses candidates[choice[i]].
        self.candidates: tuple[Format | None, ...] = (None,)
        # On the graph's device: a compiled forward selects with it, never copying it over.
        self.register_buffer("choice", torch.zeros(len(consumers), dtype=torch.long, device=device), persistent=False)
        self._choice = [0] * len(consumers)  # what ``choice`` holds, as a list

    def configure(
        self, formats: list[Format | None], rounding: str, candidates: tuple[Format | None, ...] | None = None
    ) -> None:
        """Set each slot's format; ``candidates`` (a superset, shared model-wide) for compiled forwards."""
        if len(formats) != len(self.consumers):
            raise ValueError(f"expected {len(self.consumers)} formats, got {len(formats)}")
        candidates = tuple(dict.fromkeys(formats)) if candidates is None else tuple(candidates)
        missing = [f for f in formats if f not in candidates]
        if missing:
            raise ValueError(f"formats {missing} are not among the candidates {candidates}")
        self.formats, self.rounding = list(formats), rounding
        if candidates != self.candidates:
            self.candidates = candidates
        choice = [candidates.index(f) for f in formats]
        if choice != self._choice:  # a copy to the device only when the selection changes
            self.choice.copy_(torch.tensor(choice, dtype=torch.long))
            self._choice = choice

    def _quantize(self, x: torch.Tensor, fmt: Format | None, traced: bool) -> torch.Tensor:
        if _is_identity(fmt, x.dtype):
            return x
        if traced:  # plain torch ops, which TorchInductor fuses with the ops around them
            if fmt.family == "cast":
                return round_to_dtype(x, getattr(torch, fmt.cast_dtype))
            return quantize_reference(x, fmt, fmt.block_size, self.axis % x.dim(), self.rounding)
        block = None if fmt.family == "cast" else fmt.block_size
        return quantize(x, fmt, block_size=block, axis=self.axis, rounding=self.rounding)

    def forward(self, x: torch.Tensor):
        if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            return self._forward_switched(x)
        done: dict[Format | None, torch.Tensor] = {}
        out = []
        for fmt in self.formats:
            if fmt not in done:
                done[fmt] = self._quantize(x, fmt, traced=False)
            out.append(done[fmt])
        return tuple(out)

    def _forward_switched(self, x: torch.Tensor):
        # Every candidate is computed and each slot selects one by its index tensor: the graph
        # is the same for every plan over these candidates, so switching plans never recompiles.
        quantized = [self._quantize(x, fmt, traced=True) for fmt in self.candidates]
        out = []
        for slot in range(len(self.consumers)):
            y = quantized[0]
            for k in range(1, len(quantized)):
                y = torch.where(self.choice[slot] == k, quantized[k], y)
            out.append(y)
        return tuple(out)

    def extra_repr(self) -> str:
        names = sorted({"-" if f is None else f.name for f in self.formats})
        return f"axis={self.axis}, consumers={len(self.consumers)}, formats={names}"
