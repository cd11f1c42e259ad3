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
import torch
import torch.nn.functional as F

import mpqc
from mpqc.data import load_tokens, split_tokens, text_prefix
from mpqc.evaluate import perplexity, sample_windows
from mpqc.formats import quantize
from mpqc.search.budget import SearchSpace, search_precisions
from mpqc.search.knapsack import solve_knapsack
from mpqc.search.sensitivity import _frozen_parameters, sensitivity

gran, ratio = sys.argv[1], float(sys.argv[2])
model, tok = mpqc.load_model()
graph = mpqc.capture(model, (torch.zeros(1, 16, dtype=torch.long),))
search_tokens, holdout = split_tokens(load_tokens(tok))
prefix = text_prefix(tok)
qmodel = mpqc.compile(graph, mpqc.Plan.uniform(graph, "bf16"))
low_p, high_p = search_precisions("mxint4", "bf16", weights_only=False)
space = SearchSpace(graph, gran, low_p, high_p, mpqc.search.Budget("params", ratio), None, "nearest")
vars_ = [c.name for c in space.variables()]
sizes = space.sizes()
target = space.target()
fw = sample_windows(search_tokens, 128, 4, 1, prefix)
sens = sensitivity(qmodel, space, fw, progress=False)
low = solve_knapsack({n: sens[n] for n in vars_}, {n: sizes[n] for n in vars_}, target)
ev = sample_windows(search_tokens, 128, 32, 0, prefix)


def loss_of(lowset, wins):
    qmodel.set_plan(space.plan(sorted(lowset)))
    return float(np.log(perplexity(qmodel, windows=wins, progress=False)))


def signed_grad(lowset, wins):
    """d loss / d eps_c where eps_c moves component c to its other precision, at plan lowset."""
    plan = space.plan(sorted(lowset))
    flip = space.plan(sorted(set(vars_) - set(lowset)))
    comp = {m.name: c.name for c in space.components for m in c.matmuls}
    qmodel.set_plan(plan)
    eps = {n: torch.zeros((), requires_grad=True) for n in vars_}
    hs = []
    for mname, wq in qmodel.weight_quantizers.items():
        m = graph.matmul(mname)
        c = comp.get(mname)
        if c not in eps:
            continue
        other = flip.weight_format(m)
        if other == plan.weight_format(m):
            continue

        def hook(mod, inputs, out, other=other, c=c):
            alt = mod._cache.get(mod.weight_name, inputs[0], other, mod.axis, plan.rounding)
            return out + eps[c] * (alt - out).detach()

        hs.append(wq.register_forward_hook(hook))
    for aq in qmodel.activation_quantizers:
        others = [flip.activation_format(graph.matmul(n)) for n in aq.consumers]
        curs = [plan.activation_format(graph.matmul(n)) for n in aq.consumers]
        comps = [comp.get(n) for n in aq.consumers]

        def hook(mod, inputs, outs, others=others, curs=curs, comps=comps):
            x = inputs[0]
            res = []
            for out, o, cur, c in zip(outs, others, curs, comps):
                if c not in eps or o == cur:
                    res.append(out)
                    continue
                if o is None:
                    alt = x.detach()
                else:
                    block = None if o.family == "cast" else o.block_size
                    alt = quantize(x.detach(), o, block_size=block, axis=mod.axis, rounding=plan.rounding)
                res.append(out + eps[c] * (alt - out).detach())
            return tuple(res)

        hs.append(aq.register_forward_hook(hook))
    g = np.zeros((len(wins), len(vars_)))
    with _frozen_parameters(qmodel), torch.enable_grad():
        for w, win in enumerate(wins):
            ids = win[None]
            loss = F.cross_entropy(qmodel(ids)[0, :-1].float(), ids[0, 1:])
            gr = torch.autograd.grad(loss, [eps[n] for n in vars_], allow_unused=True)
            g[w] = [0.0 if d is None else d.item() for d in gr]
    for h in hs:
        h.remove()
    return g


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
