"""Which per-component score makes the better one-shot knapsack plan, judged on held-out text.

On the real SmolLM2-135M (MXINT4 W+A vs BF16), for each setting the knapsack plan (exact 0/1
integer program under the budget) of three scores, each from the same Fisher windows of the
search text, and each plan's perplexity on held-out windows:

- ``window``: the square of one signed sum per window and component, 0.5 mean_w g[w, c]^2
  (``window_gradients``; the knapsack's score before 2026-12-02);
- ``element``: the per-element diagonal empirical Fisher at the all-high plan, the kind of
  score ModelOpt's auto_quantize ranks by (``sensitivity``; the knapsack's score now);
- ``at_low``: the same per-element estimate taken at the all-low plan for restoring each
  component, and ``blend``: (1 - Q_r) * element + Q_r * at_low, each scaled to mean 1.

    python benchmarks/sensitivity_scores.py [--fisher-windows 4] [--holdout-windows 64]
"""

from __future__ import annotations

import argparse

import numpy as np
import search_setup

import mpqc
from mpqc.evaluate import perplexity
from mpqc.search.budget import SearchSpace, search_precisions
from mpqc.search.knapsack import solve_knapsack
from mpqc.search.sensitivity import sensitivity, window_gradients

SETTINGS = (("matmul", 0.5), ("matmul", 0.9), ("matmul", 0.95), ("layer", 0.5))


def scores(qmodel, graph, granularity, ratio, windows) -> tuple[SearchSpace, dict]:
    low_p, high_p = search_precisions("mxint4", "bf16", weights_only=False)
    space = SearchSpace(graph, granularity, low_p, high_p, mpqc.search.Budget("params", ratio))
    g = window_gradients(qmodel, space, windows, progress=False)
    names = [c.name for c in space.variables()]
    out = {
        "window": {c.name: float(0.5 * np.mean(g[:, i] ** 2)) for i, c in enumerate(space.components)},
        "element": sensitivity(qmodel, space, windows, progress=False),
        "at_low": sensitivity(qmodel, space, windows, at=[c.name for c in space.components], progress=False),
    }
    scale = {k: float(np.mean([out[k][n] for n in names])) for k in ("element", "at_low")}
    out["blend"] = {
        n: (1 - ratio) * out["element"][n] / scale["element"] + ratio * out["at_low"][n] / scale["at_low"]
        for n in names
    }
    return space, {k: {n: v[n] for n in names} for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fisher-windows", type=int, default=4)
    ap.add_argument("--holdout-windows", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    bench = search_setup.load(args.seed)
    graph, qmodel = bench.graph, bench.qmodel
    # The windows benchmarks/search_quality.py holds out, and the search's Fisher windows.
    held_out, fisher = bench.held_out(args.holdout_windows), bench.windows("fisher", args.fisher_windows)
    base = perplexity(qmodel, windows=held_out, progress=False)
    print(
        f"all-BF16 held-out perplexity {base:.3f} ({args.holdout_windows} x 128 tokens); "
        f"scores from {args.fisher_windows} windows x 128 tokens"
    )
    print(f"{'setting':<14} {'score':<8} {'held-out ppl':>12} {'delta_ppl':>10}")
    for granularity, ratio in SETTINGS:
        space, by_score = scores(qmodel, graph, granularity, ratio, fisher)
        sizes, target = space.sizes(), space.target()
        for label, score in by_score.items():
            low = solve_knapsack(score, {n: sizes[n] for n in score}, target)
            qmodel.set_plan(space.plan(low))
            ppl = perplexity(qmodel, windows=held_out, progress=False)
            print(
                f"{granularity + ' ' + str(ratio):<14} {label:<8} {ppl:>12.3f} {100 * (ppl / base - 1):>9.1f}%",
                flush=True,
            )


if __name__ == "__main__":
    main()
