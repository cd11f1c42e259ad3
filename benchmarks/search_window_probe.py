"""Probe: does the plan best on a search's 8 windows stay best on held-out text, by perplexity
or by KL divergence to the BF16 model?

On SmolLM2-135M at matmul Q_r 0.5 (MXINT4 W+A vs BF16): the knapsack plan of the Fisher scores
and N_PLANS - 1 neighbours (1-3 budget-keeping exchanges each, seeded), each scored by NLL on
the 8 search windows of benchmarks/search_quality.py, by mean KL(BF16 || plan) on the same
windows, and by NLL on its 64 held-out windows. Prints one row per plan
(search NLL, search KL, held-out NLL) and the rank correlations. docs/search.md quotes 9 plans.

    python benchmarks/search_window_probe.py
"""

import time

import numpy as np
import search_setup
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

import mpqc
from mpqc.search import SearchSpace
from mpqc.search.budget import Budget, search_precisions
from mpqc.search.knapsack import solve_knapsack
from mpqc.search.plan_samplers import PlanContext, exchanges
from mpqc.search.sensitivity import sensitivity

N_PLANS = 9

torch.set_grad_enabled(False)
bench = search_setup.load(seed=0)
g = bench.graph
low, high = search_precisions("mxint4", "bf16", weights_only=False)
space = SearchSpace(g, "matmul", low, high, Budget("params", 0.5))
q = mpqc.compile(g, space.plan([]))
W, H = bench.windows("search", 8), bench.held_out(64)
var = [c.name for c in space.variables()]
sizes = space.sizes()
target = space.target()
with torch.enable_grad():
    sens = sensitivity(q, space, bench.windows("fisher", 4), progress=False)
P = frozenset(solve_knapsack({n: sens[n] for n in var}, {n: sizes[n] for n in var}, target))


def logp(windows):
    out = []
    for i in range(0, len(windows), 8):
        out.append(F.log_softmax(q(windows[i : i + 8]).float(), -1)[:, :-1])
    return torch.cat(out)


q.set_plan(space.plan([]))
ref = logp(W)


def score(lowset):
    q.set_plan(space.plan(sorted(lowset)))
    lp = logp(W)
    nll = -lp.gather(-1, W[:, 1:, None]).mean().item()
    kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
    held = mpqc.evaluate.nll(q, windows=H, progress=False)
    return nll, kl, held


rng = np.random.default_rng(0)
ctx = PlanContext(
    names=tuple(var),
    sizes={n: sizes[n] for n in var},
    target=target,
    scores={n: sens[n] for n in var},
    layers={n: None for n in var},
)
plans = [P]
while len(plans) < N_PLANS:
    cur = plans[0]
    for _ in range(int(rng.integers(1, 4))):
        ex = exchanges(ctx, cur, {n: rng.random() for n in var}, limit=40)
        cur = ex[int(rng.integers(len(ex)))]
    if cur not in plans:
        plans.append(cur)
rows = []
for p in plans:
    t = time.time()
    r = score(p)
    rows.append(r)
    print([f"{x:.4f}" for x in r], f"{time.time() - t:.0f}s", flush=True)
r = np.array(rows)
print("spearman search-nll vs held", spearmanr(r[:, 0], r[:, 2])[0], " kl vs held", spearmanr(r[:, 1], r[:, 2])[0])
print("pearson", np.corrcoef(r[:, 0], r[:, 2])[0, 1], np.corrcoef(r[:, 1], r[:, 2])[0, 1])
