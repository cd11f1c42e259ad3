"""Budgets and the priority encoding that keeps every sampled plan inside its budget.

A search chooses which components go low. Every budget here is linear in that choice: each
component has a size in the budget's unit (its share of matmul parameters, of MACs, or of
the bits it saves), and a plan meets the budget when the low components' sizes add up to
at least the target. A sampler proposes one priority in [0, 1] per component; ``decode``
takes components in priority order until the target is met, so any Optuna sampler works
under the constraint and no trial is wasted on an infeasible plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from mpqc.formats import get_format
from mpqc.graph import Component, Graph
from mpqc.plan import Plan, Precision

BUDGET_KINDS = ("params", "macs", "bits")


@dataclasses.dataclass(frozen=True)
class Budget:
    """``kind`` "params" or "macs": quantization ratio at least ``value`` (in [0, 1]);
    "bits": average bits per matmul weight at most ``value``."""

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"unknown budget kind {self.kind!r}; valid: {', '.join(BUDGET_KINDS)}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            raise TypeError(f"a budget value is a number, got {self.value!r}")
        if self.kind in ("params", "macs") and not 0.0 <= self.value <= 1.0:
            raise ValueError(f"a quantization ratio must lie in [0, 1], got {self.value}")
        if self.kind == "bits" and self.value <= 0:
            raise ValueError(f"an average-bits budget must be positive, got {self.value}")

    def __str__(self) -> str:
        return f"Q_r({self.kind}) >= {self.value:g}" if self.kind != "bits" else f"average bits <= {self.value:g}"


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The components a search assigns, the two precisions, and each component's budget size."""

    graph: Graph
    granularity: object
    low: Precision
    high: Precision
    budget: Budget
    block_size: object = None
    rounding: str = "nearest"

    @property
    def components(self) -> tuple[Component, ...]:
        return self.graph.components(self.granularity)

    def plan(self, low_components: Sequence[str]) -> Plan:
        return Plan(self.graph, {name: self.low for name in low_components}, default=self.high,
                    granularity=self.granularity, block_size=self.block_size, rounding=self.rounding)

    def sizes(self) -> dict[str, float]:
        """Each component's contribution to the budget when it goes low (same unit as target)."""
        comps = self.components
        if self.budget.kind == "params":
            total = sum(c.params for c in comps)
            return {c.name: c.params / total for c in comps}
        if self.budget.kind == "macs":
            total = sum(c.macs for c in comps)
            return {c.name: c.macs / total for c in comps}
        # bits saved per component, over all matmul parameters: average bits fall by this much
        all_high = self.plan([])
        saved = {}
        for c in comps:
            saved[c.name] = (all_high.weight_bits() - self.plan([c.name]).weight_bits()) / self.graph.total_params
        return saved

    def target(self) -> float:
        if self.budget.kind != "bits":
            return self.budget.value
        return self.plan([]).average_bits() - self.budget.value  # bits that must be saved

    def reachable(self) -> tuple[float, float]:
        """(smallest, largest) budget value a plan can reach: all high, all low."""
        lo, hi = self.plan([]), self.plan([c.name for c in self.components])
        if self.budget.kind == "bits":
            return hi.average_bits(), lo.average_bits()
        return lo.quantization_ratio(self.budget.kind), hi.quantization_ratio(self.budget.kind)

    def achieved(self, plan: Plan) -> float:
        return plan.average_bits() if self.budget.kind == "bits" else plan.quantization_ratio(self.budget.kind)


def decode(priorities: Mapping[str, float], sizes: Mapping[str, float], target: float) -> list[str]:
    """The components that go low: the budget met with the least overshoot the priorities allow.

    First pass: in priority order, take each component that still fits under the target.
    If the target is not met exactly, add the smallest remaining component that meets it
    (ties: the higher priority). Components of size zero (attention matmuls under a
    parameter budget) cost nothing: they go low when their priority is above one half.
    """
    eps = 1e-12
    order = sorted(priorities, key=lambda n: (-priorities[n], n))
    chosen, total = [], 0.0
    for name in order:
        size = sizes[name]
        if size == 0:
            if priorities[name] > 0.5:
                chosen.append(name)
        elif total + size <= target + eps:
            chosen.append(name)
            total += size
    if total < target - eps:
        rest = [n for n in order if n not in chosen and sizes[n] > 0]
        meeting = [n for n in rest if total + sizes[n] >= target - eps]
        if meeting:
            pick = min(meeting, key=lambda n: (sizes[n], order.index(n)))
            chosen.append(pick)
        else:  # even everything is not enough: take all
            chosen.extend(rest)
    return chosen


def low_precision(low, high, *, weights_only: bool) -> tuple[Precision, Precision]:
    """The two precisions of a search from format names: W+A low, or weights only."""
    high_p = Precision.parse(high)
    low_fmt = get_format(low)
    low_p = Precision(low_fmt, high_p.activation if weights_only else low_fmt)
    return low_p, high_p
