"""Does the signed first-order change at a plan predict what flipping one component does?

On the real SmolLM2-135M (MXINT4 W+A vs BF16): the knapsack plan of the per-element Fisher
scores (4 windows), the signed first-order loss change of moving each search variable to
its other precision at that plan (8 windows), and 16 single flips (8 low components raised,
8 high ones lowered, drawn with seed 0) measured on 32 search windows; prints each flip and
the correlations of the measured change with the first-order change and with the Fisher
score at the all-high plan.

    python benchmarks/flip_probe.py matmul 0.9
"""

import sys
import time

import numpy as np
import search_setup

import mpqc
from mpqc.evaluate import perplexity
from mpqc.search.budget import SearchSpace, search_precisions
from mpqc.search.knapsack import solve_knapsack
from mpqc.search.sensitivity import sensitivity, window_gradients

gran, ratio = sys.argv[1], float(sys.argv[2])
bench = search_setup.load(seed=0)
graph, qmodel = bench.graph, bench.qmodel
low_p, high_p = search_precisions("mxint4", "bf16", weights_only=False)
space = SearchSpace(graph, gran, low_p, high_p, mpqc.search.Budget("params", ratio), None, "nearest")
vars_ = [c.name for c in space.variables()]
sizes = space.sizes()
target = space.target()
fw = bench.windows("fisher", 4)
sens = sensitivity(qmodel, space, fw, progress=False)
low = solve_knapsack({n: sens[n] for n in vars_}, {n: sizes[n] for n in vars_}, target)
ev = bench.windows("search", 32)


def loss_of(lowset, wins):
    qmodel.set_plan(space.plan(sorted(lowset)))
    return float(np.log(perplexity(qmodel, windows=wins, progress=False)))


def signed_grad(lowset, wins):
    """d loss / d eps_c where eps_c moves component c to its other precision, at plan lowset."""
    g = window_gradients(qmodel, space, wins, at=lowset, progress=False)
    column = {c.name: i for i, c in enumerate(space.components)}
    return g[:, [column[n] for n in vars_]]


t = time.time()
g = signed_grad(low, ev[:8])
print("grad pass", time.time() - t, flush=True)
base = loss_of(low, ev)
rng = np.random.default_rng(0)
picks = list(rng.choice([n for n in vars_ if n in low], 8, replace=False)) + list(
    rng.choice([n for n in vars_ if n not in low], 8, replace=False)
)
pred, meas, fish = [], [], []
idx = {n: i for i, n in enumerate(vars_)}
for n in picks:
    s = set(low) ^ {n}
    meas.append(loss_of(s, ev) - base)
    pred.append(g[:, idx[n]].mean())
    fish.append((-1 if n in low else 1) * sens[n])
    print(
        n,
        "low" if n in low else "high",
        f"measured {meas[-1]:+.4f} first-order {pred[-1]:+.4f} fisher {fish[-1]:+.5f}",
        flush=True,
    )
print("corr first-order", np.corrcoef(pred, meas)[0, 1], "corr fisher", np.corrcoef(fish, meas)[0, 1])
