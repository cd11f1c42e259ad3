"""Budgets and the priority encoding that keeps every sampled plan inside its budget.

A search chooses which components go low. Every budget here is linear in that choice: each
component has a size in the budget's unit (its share of matmul parameters, of MACs, or of
the bits it saves), and a plan meets the budget when the low components' sizes add up to
at least the target. A sampler proposes one priority in [0, 1] per component; ``decode``
fills components in priority order under the target and finishes with the crossing that
overshoots least, so any Optuna sampler works under the constraint and no trial is wasted
on an infeasible plan.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Mapping, Sequence

from mpqc.formats import get_format, stores_rows_of
from mpqc.graph import Component, Graph
from mpqc.plan import Plan, Precision, keep_high_entries, resolve_keep_high

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
    # Each a Precision, or candidates in order of preference: a component takes the first whose
    # weight format stores every one of its weights' rows (q4_k where rows are whole 256-blocks,
    # else q5_0), as llama-quantize falls back. Normalized to tuples.
    low: Precision | tuple[Precision, ...]
    high: Precision | tuple[Precision, ...]
    budget: Budget
    block_size: object = None
    rounding: str = "nearest"
    # Search components that cannot pay for the budget (size zero) or that the low precision
    # would not narrow; by default they stay high and are no search variable.
    search_dominated: bool = False
    runtime: str | None = None  # a Plan target ("llama.cpp": scored with llama.cpp's activations)
    # Components (names or roles) that stay high: not searched, and outside Q_r (the plans'
    # ``keep_high``), so a ratio budget is a share of the searchable matmuls.
    keep_high: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "low", _candidates(self.low, "low"))
        object.__setattr__(self, "high", _candidates(self.high, "high"))
        object.__setattr__(self, "keep_high", keep_high_entries(self.keep_high))
        object.__setattr__(self, "kept_high", resolve_keep_high(self.graph, self.granularity, self.keep_high))
        every = self.graph.components(self.granularity)  # the kept-high ones too: they stay high
        object.__setattr__(self, "_low_of", {c.name: _first_stored(self.low, c, "low") for c in self.components})
        object.__setattr__(self, "_high_of", {c.name: _first_stored(self.high, c, "high") for c in every})
        object.__setattr__(self, "default", self._default_high())

    def _default_high(self) -> Precision:
        """The plans' default: the kept-high components' high precision (a plan keeps them at its
        default), else the last high candidate; every other component is assigned explicitly."""
        kept = {self._high_of[n] for n in self.kept_high}
        if len(kept) > 1:
            raise ValueError(
                f"the kept-high components {list(self.kept_high)} take different high candidates "
                f"({', '.join(sorted(map(str, kept)))}); a plan keeps them all at one default precision"
            )
        return kept.pop() if kept else self.high[-1]

    def low_of(self, component: Component | str) -> Precision:
        return self._low_of[getattr(component, "name", component)]

    def high_of(self, component: Component | str) -> Precision:
        return self._high_of[getattr(component, "name", component)]

    @property
    def low_label(self) -> str:
        return ",".join(map(str, self.low))

    @property
    def high_label(self) -> str:
        return ",".join(map(str, self.high))

    @property
    def components(self) -> tuple[Component, ...]:
        """The components the search chooses among (all but the kept-high ones)."""
        return tuple(c for c in self.graph.components(self.granularity) if c.name not in self.kept_high)

    def variables(self) -> tuple[Component, ...]:
        """The components a search chooses for: each one's low choice changes the plan and pays
        for some of the budget. Under a parameter or bits budget the attention matmuls (no
        weights) are no variable; under a MACs budget they are."""
        if self.search_dominated:
            return self.components
        sizes = self.sizes()
        return tuple(c for c in self.components if sizes[c.name] > 0 and self._narrowed(c))

    def _narrowed(self, component: Component) -> bool:
        """Whether the low precision stores or computes anything of ``component`` narrower."""
        has_weight = any(m.weight is not None for m in component.matmuls)
        low, high = self.low_of(component), self.high_of(component)
        if has_weight and low.weight.bits_per_element < high.weight.bits_per_element:
            return True
        if low.activation is None:
            return False
        return high.activation is None or low.activation.bits_per_element < high.activation.bits_per_element

    def plan(self, low_components: Sequence[str]) -> Plan:
        low = set(low_components)
        assignments = {}
        for c in self.components:
            p = self.low_of(c) if c.name in low else self.high_of(c)
            if p != self.default:
                assignments[c.name] = p
        return Plan(
            self.graph,
            assignments,
            default=self.default,
            granularity=self.granularity,
            block_size=self.block_size,
            rounding=self.rounding,
            target=self.runtime,
            keep_high=self.keep_high,
        )

    def sizes(self) -> dict[str, float]:
        """Each component's contribution to the budget when it goes low (same unit as target)."""
        comps = self.components
        if self.budget.kind != "bits":
            size = (lambda c: c.params) if self.budget.kind == "params" else (lambda c: c.macs)
            total = sum(size(c) for c in comps)  # Q_r's denominator: every component but the kept-high ones
            if not total:
                raise ValueError(f"{self.budget} counts nothing: keep_high={list(self.keep_high)} keeps all there is")
            return {c.name: size(c) / total for c in comps}
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
        lo, hi = self.plan([]), self.plan([c.name for c in self.variables()])
        if self.budget.kind == "bits":
            return hi.average_bits(), lo.average_bits()
        return lo.quantization_ratio(self.budget.kind), hi.quantization_ratio(self.budget.kind)

    def achieved(self, plan: Plan) -> float:
        return plan.average_bits() if self.budget.kind == "bits" else plan.quantization_ratio(self.budget.kind)


def decode(priorities: Mapping[str, float], sizes: Mapping[str, float], target: float) -> list[str]:
    """The components that go low: the budget met with the least overshoot the priorities allow.

    Greedy fill: in priority order, take each component that still fits under the target. If
    that meets the target (within 1e-12), it is the plan. Otherwise one component has to cross
    the target, and the plan is the one of least overshoot among these finishes:

    - the greedy fill plus the smallest remaining component that reaches the target;
    - for each component ``r`` the fill left out, ``r`` last: the shortest priority-order
      prefix of the greedy fill that ``r`` brings to the target, plus ``r``;
    - for each such ``r``, ``r`` first: ``r`` forced in, the greedy fill redone in priority
      order under the target around it, then (if still short) the smallest remaining
      component that reaches the target.

    Ties (overshoots within 1e-12) go to the higher-priority set: the one holding the
    highest-ranked component where the two differ. So a component larger than the rest put
    together (a tied lm_head) is reachable on its own plus a few small ones, instead of only
    with everything. Components of size zero (attention matmuls under a parameter budget) cost
    nothing: they go low when their priority is above one half. The list is in priority order.
    O(n^2) in the number of components at worst (about 2 ms for 300).
    """
    return _Decoder(priorities, sizes, target).decode()


_EPS = 1e-12


class _Decoder:
    """decode's state: components as ranks in priority order, their sizes, the target."""

    def __init__(self, priorities: Mapping[str, float], sizes: Mapping[str, float], target: float):
        self.order = sorted(priorities, key=lambda n: (-priorities[n], n))
        self.free = [i for i, n in enumerate(self.order) if sizes[n] == 0 and priorities[n] > 0.5]
        self.costly = [i for i, n in enumerate(self.order) if sizes[n] != 0]  # ranks, in priority order
        self.size = [float(sizes[n]) for n in self.order]
        self.by_size = sorted((i for i in self.costly if self.size[i] > 0), key=lambda i: (self.size[i], i))
        self.monotone = all(self.size[i] > 0 for i in self.costly)
        self.target = target

    def fill(self, forced: int | None) -> tuple[set[int], float]:
        """In priority order, every component that still fits under the target (``forced`` first)."""
        chosen, total = set(), 0.0
        if forced is not None:
            chosen.add(forced)
            total = self.size[forced]
        cap = self.target + _EPS
        for i in self.costly:
            s = self.size[i]
            if total + s <= cap and i != forced:
                chosen.add(i)
                total += s
                if self.monotone and total >= self.target - _EPS:  # met: only sizes under 2e-12 could still fit
                    break
        return chosen, total

    def finish(self, chosen: set[int], total: float) -> tuple[set[int], float] | None:
        """``chosen`` plus the smallest component outside it that reaches the target, or None."""
        for i in self.by_size:  # ascending size: the first that reaches and is free to add
            if i not in chosen and total + self.size[i] >= self.target - _EPS:
                return chosen | {i}, total + self.size[i]
        return None

    def ranked(self, chosen) -> list[str]:
        return [self.order[i] for i in sorted(set(chosen).union(self.free))]

    def decode(self) -> list[str]:
        chosen, total = self.fill(None)
        if total >= self.target - _EPS:
            return self.ranked(chosen)
        best = self.finish(chosen, total)
        if best is None:  # even everything is not enough: take all
            return self.ranked(self.costly)
        filled = sorted(chosen)  # the fill, in priority order, and its running totals
        prefix = list(itertools.accumulate((self.size[i] for i in filled), initial=0.0))
        for r in self.by_size:
            if r in chosen:
                continue
            if self.monotone and self.size[r] - self.target > best[1] - self.target + _EPS:
                break  # r alone overshoots more than the best, and so do all after it (ascending sizes)
            for candidate in self._crossings_with(r, filled, prefix):
                if self._better(candidate, best):
                    best = candidate
        return self.ranked(best[0])

    def _better(self, cand: tuple[set[int], float], best: tuple[set[int], float]) -> bool:
        over, best_over = cand[1] - self.target, best[1] - self.target
        return over < best_over - _EPS or (over <= best_over + _EPS and _higher_priority(cand[0], best[0]))

    def _crossings_with(self, r: int, filled: list[int], prefix: list[float]) -> list[tuple[set[int], float]]:
        """The plans that cross the target with ``r``, a component the fill left out: r last, r first."""
        out = []
        # r last: the fill's shortest priority prefix that r completes (the fill left r out, so the
        # fill without r is the same fill, and all of it plus r meets the target)
        need = self.target - _EPS - self.size[r]
        k = (
            bisect.bisect_left(prefix, need)
            if self.monotone
            else next((k for k, p in enumerate(prefix) if p >= need), None)
        )
        if k is not None and k < len(prefix):  # always, unless negative sizes (bits a component adds)
            out.append((set(filled[:k]) | {r}, prefix[k] + self.size[r]))
        # r first: the fill redone under the target around r, then the smallest that reaches
        cand = self.fill(r)
        if cand[1] < self.target - _EPS:
            cand = self.finish(*cand)
        if cand is not None:
            out.append(cand)
        return out


def _higher_priority(a: set[int], b: set[int]) -> bool:
    """Whether rank set ``a`` holds the highest-ranked (smallest) rank where ``a`` and ``b`` differ."""
    diff = a ^ b
    return bool(diff) and min(diff) in a


def search_precisions(low, high, *, weights_only: bool) -> tuple[tuple[Precision, ...], tuple[Precision, ...]]:
    """The candidates of a search from format names (each a name, a comma-separated list of
    names in order of preference, or a sequence of them): low W+A, or weights only."""
    highs = tuple(Precision.parse(h) for h in _names(high, "high"))
    high_act = highs[0].activation
    lows = tuple(Precision(f, high_act if weights_only else f) for f in map(get_format, _names(low, "low")))
    return lows, highs


def _names(spec, which: str) -> list:
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else list(spec)
    if not names or any(n == "" for n in names):
        raise ValueError(f"{which} is a format name or a comma-separated list of them (e.g. 'q4_k,q5_0'), got {spec!r}")
    return names


def _candidates(spec, which: str) -> tuple[Precision, ...]:
    out = (spec,) if isinstance(spec, Precision) else tuple(spec)
    if not out or not all(isinstance(p, Precision) for p in out):
        raise TypeError(f"a search space's {which} is a Precision or a tuple of them, got {spec!r}")
    return out


def _first_stored(candidates: tuple[Precision, ...], component: Component, which: str) -> Precision:
    """The first candidate whose weight format stores every weight row of ``component``."""
    lengths = [m.weight_shape[m.weight_reduction_axis] for m in component.matmuls if m.has_weight]
    for p in candidates:
        if all(stores_rows_of(p.weight, n) for n in lengths):
            return p
    names = ",".join(map(str, candidates))
    raise ValueError(
        f"{which}={names!r} cannot store component {component.name}: its weight rows have "
        f"{sorted(set(lengths))} elements, not whole blocks of {candidates[-1].weight.block_size}; "
        f"end the list with a format that takes any row, e.g. {which}='{names},q8_0' "
        "(llama-quantize falls back from q4_k to q5_0, q5_k to q5_1, q6_k to q8_0)"
    )
