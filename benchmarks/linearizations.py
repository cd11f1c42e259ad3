"""Where a one-shot plan's scores should be taken: probes of the knapsack plan on held-out text.

On the real SmolLM2-135M (MXINT4 W+A vs BF16), the same Fisher windows (4 x 128 tokens, seed
1), search windows (8, seed 0), fresh windows (16, seed 2) and held-out windows (64, seed 7)
as ``benchmarks/search_quality.py``. Each probe prints knapsack plans and their held-out
delta_ppl:

- ``blend``: the knapsack plan of (1 - w) * Fisher at all-high + w * Fisher at all-low (each
  scaled to mean 1) for w from 0 to 1, with each plan's perplexity on the search and fresh
  windows too (can the search tell them apart?);
- ``iterate``: the Fisher estimate taken at the plan itself, three times over (the plan of
  the estimate at the last plan alone, and of the mean of all estimates so far, which the
  next round starts from);
- ``path``: the Fisher estimate taken along the way to the budget, in K stages: from all-high,
  each stage sends low the knapsack optimum of the estimate at the plan so far, for the next
  K-th of the budget (``fwd``); from all-low, each stage keeps low the optimum of the estimate
  at the plan so far, for the next K-th of the way down (``rev``); K Fisher passes each;
- ``measured``: single flips measured on the search windows instead of estimated (each
  component low alone at all-high, and each flipped at the knapsack plan), and the knapsack
  plans of those measured costs (one evaluation per component and point: for small spaces).

    python benchmarks/linearizations.py blend matmul:0.9 matmul:0.5
    python benchmarks/linearizations.py measured layer:0.5
    python benchmarks/linearizations.py path matmul:0.9 matmul:0.5 matmul:0.95 layer:0.5
"""

from __future__ import annotations

import argparse

import numpy as np
import search_setup

import mpqc
from mpqc.evaluate import perplexity
from mpqc.search.budget import SearchSpace, search_precisions
from mpqc.search.knapsack import solve_knapsack
from mpqc.search.sensitivity import sensitivity


class Setting:
    """One budget on the model: its variables, the knapsack, losses on each window set."""

    def __init__(self, qmodel, graph, windows, granularity, ratio):
        low_p, high_p = search_precisions("mxint4", "bf16", weights_only=False)
        self.qmodel, self.windows = qmodel, windows
        self.space = SearchSpace(graph, granularity, low_p, high_p, mpqc.search.Budget("params", ratio))
        self.names = [c.name for c in self.space.variables()]
        sizes = self.space.sizes()
        self.sizes, self.target = {n: sizes[n] for n in self.names}, self.space.target()
        self.label = f"{granularity} {ratio}"

    def knapsack(self, score, among=None, target=None) -> list[str]:
        """The least-score set among ``among`` (default: every variable) reaching ``target``."""
        among = self.names if among is None else among
        target = self.target if target is None else target
        return solve_knapsack({n: score[n] for n in among}, {n: self.sizes[n] for n in among}, target)

    def fisher(self, at=()) -> dict[str, float]:
        """The per-element Fisher at the plan ``at``, scaled to mean 1 over the variables."""
        f = sensitivity(self.qmodel, self.space, self.windows["fisher"], at=at, progress=False)
        mean = float(np.mean([f[n] for n in self.names]))
        return {n: f[n] / mean for n in self.names}

    def ppl(self, low, which: str) -> float:
        self.qmodel.set_plan(self.space.plan(sorted(low)))
        return perplexity(self.qmodel, windows=self.windows[which], progress=False)

    def delta(self, low) -> str:
        return f"{100 * (self.ppl(low, 'held') / self.windows['base'] - 1):.1f}%"


def blend(s: Setting) -> None:
    high, low = s.fisher(), s.fisher(at=[c.name for c in s.space.components])
    previous = None
    for w in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        plan = s.knapsack({n: (1 - w) * high[n] + w * low[n] for n in s.names})
        if set(plan) == previous:
            print(s.label, f"w={w}", "same plan", flush=True)
            continue
        previous = set(plan)
        search, fresh = s.ppl(plan, "search"), s.ppl(plan, "fresh")
        print(s.label, f"w={w}", f"held {s.delta(plan)}", f"search8 {search:.2f}", f"fresh16 {fresh:.2f}", flush=True)


def iterate(s: Setting) -> None:
    estimates = [s.fisher()]
    plan = s.knapsack(estimates[0])
    print(s.label, "P0", s.delta(plan), flush=True)
    for it in range(1, 4):
        estimates.append(s.fisher(at=plan))
        alone = s.knapsack(estimates[-1])
        mean = s.knapsack({n: np.mean([e[n] for e in estimates]) for n in s.names})
        print(
            s.label,
            f"it{it}",
            f"at-plan {s.delta(alone)}",
            f"mean {s.delta(mean)}",
            "changed",
            len(set(mean) ^ set(plan)),
            flush=True,
        )
        plan = mean


def path(s: Setting) -> None:
    start = set(s.knapsack(s.fisher()))
    print(s.label, "knapsack", s.delta(start), f"fresh16 {s.ppl(start, 'fresh'):.2f}", flush=True)
    for direction, walk in (("fwd", _walk_up), ("rev", _walk_down)):
        for stages in (2, 4, 8):
            plan = walk(s, stages)
            print(
                s.label,
                direction,
                f"K={stages}",
                s.delta(plan),
                f"fresh16 {s.ppl(plan, 'fresh'):.2f}",
                "changed",
                len(plan ^ start),
                flush=True,
            )


def _walk_up(s: Setting, stages: int) -> set[str]:
    low: set[str] = set()
    for k in range(1, stages + 1):
        need = s.target * k / stages - sum(s.sizes[n] for n in low)
        if need > 0:  # an earlier stage's overshoot may already cover this one: no Fisher pass
            high = [n for n in s.names if n not in low]
            low |= set(s.knapsack(s.fisher(at=sorted(low)), among=high, target=need))
    return low


def _walk_down(s: Setting, stages: int) -> set[str]:
    low, total = set(s.names), sum(s.sizes.values())
    for k in range(1, stages + 1):
        keep = total - (total - s.target) * k / stages
        low = set(s.knapsack(s.fisher(at=sorted(low)), among=sorted(low), target=keep))
    return low


def measured(s: Setting) -> None:
    fisher = s.fisher()
    start = set(s.knapsack(fisher))
    print(s.label, "knapsack", s.delta(start), flush=True)
    loss = {}

    def log_loss(low):
        key = frozenset(low)
        if key not in loss:
            loss[key] = float(np.log(s.ppl(low, "search")))
        return loss[key]

    at_high = {n: log_loss({n}) - log_loss(()) for n in s.names}
    at_plan = {
        n: log_loss(start) - log_loss(start - {n}) if n in start else log_loss(start | {n}) - log_loss(start)
        for n in s.names
    }
    print(s.label, "corr fisher / measured at all-high", f"{_correlation(fisher, at_high, s.names):.2f}")
    for label, costs in (
        ("measured at all-high", at_high),
        ("measured at the knapsack plan", at_plan),
        ("mean of the two", {n: 0.5 * (at_high[n] + at_plan[n]) for n in s.names}),
    ):
        plan = s.knapsack({n: max(c, 0.0) for n, c in costs.items()})
        print(s.label, label, s.delta(plan), "changed", len(set(plan) ^ start), flush=True)
    print(s.label, f"{len(loss)} evaluations of {len(s.windows['search'])} windows")


def _correlation(a, b, names) -> float:
    return np.corrcoef([a[n] for n in names], [b[n] for n in names])[0, 1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probe", choices=("blend", "iterate", "path", "measured"))
    ap.add_argument("settings", nargs="+", help="granularity:ratio, e.g. matmul:0.9")
    args = ap.parse_args()
    bench = search_setup.load(seed=0)
    graph, qmodel = bench.graph, bench.qmodel
    windows = {"held": bench.held_out(64)}
    windows.update((role, bench.windows(role, n)) for role, n in (("fisher", 4), ("search", 8), ("fresh", 16)))
    windows["base"] = perplexity(qmodel, windows=windows["held"], progress=False)
    print(f"all-BF16 held-out perplexity {windows['base']:.3f}")
    for setting in args.settings:
        granularity, ratio = setting.split(":")
        {"blend": blend, "iterate": iterate, "path": path, "measured": measured}[args.probe](
            Setting(qmodel, graph, windows, granularity, float(ratio))
        )


if __name__ == "__main__":
    main()
