"""Two more one-shot scores for the knapsack, judged on held-out text (docs/search.md, probes 9-10).

On the real SmolLM2-135M (MXINT4 W+A vs BF16), at matmul Q_r 0.5, 0.9, 0.95 and layer Q_r 0.5,
with the Fisher, search and held-out windows of benchmarks/search_quality.py:

- ``output``: the diagonal empirical Fisher over the elements of each matmul's *output*, as
  NVIDIA ModelOpt's auto_quantize takes it: 0.5 mean_w sum_e (dL/dY_e * (Y_low - Y_high)_e)^2,
  Y_low being the matmul with both operands in the low format. Its knapsack plan beside that of
  ``sensitivity`` (the per-element Fisher over the operands, the knapsack's score).
- ``covariance``: interactions from the signed per-window first-order changes g[w, c]
  (``window_gradients``, from more windows): the estimate of a plan S is
  sum_{c in S} fisher_c + lam * 0.5 mean_w [(sum_{c in S} g[w, c])^2 - sum_{c in S} g[w, c]^2],
  the per-element diagonal plus the off-diagonal of the window-level empirical Fisher. From the
  knapsack plan, best-improvement exchanges (one low component up, one high one down, the
  budget kept within the knapsack's overshoot or 1%) until none lowers the estimate.
- ``shared``: the interactions the per-element Fisher can see exactly. The consumers of one
  activation (q, k and v of a layer; gate and up) quantize the same tensor, so the same
  element moves by the same delta in each: for a set S of them low, the element's first-order
  change is the sum of their changes, and 0.5 sum_e (sum_{c in S} g_{c,e})^2 holds, besides
  the diagonal, the cross terms sum_e g_{a,e} g_{b,e}. A layer's score sums its consumers'
  changes before squaring; at matmul granularity the cross terms of components sharing an
  input enter a quadratic 0/1 program (linearized, ``scipy.optimize.milp``).

    python benchmarks/score_probes.py output
    python benchmarks/score_probes.py covariance [--gradient-windows 32]
    python benchmarks/score_probes.py shared
"""

from __future__ import annotations

import argparse
import itertools
from collections import defaultdict

import numpy as np
import search_setup
import torch
import torch.nn.functional as F
from scipy.optimize import Bounds, LinearConstraint, milp

import mpqc
from mpqc.evaluate import perplexity, sample_windows
from mpqc.search.budget import SearchSpace, search_precisions
from mpqc.search.knapsack import solve_knapsack
from mpqc.search.sensitivity import (
    _flip_perturbations,
    _frozen_parameters,
    _moved,
    _window_loss,
    sensitivity,
    window_gradients,
)

SETTINGS = (("matmul", 0.5), ("matmul", 0.9), ("matmul", 0.95), ("layer", 0.5))


class OutputTaps:
    """After every matmul of a compiled model, ``out + e * (low - out)``: e a zero tensor per
    element, ``low`` the same matmul with both operands in the low plan's formats."""

    def __init__(self, qmodel, graph, low_plan):
        self.info, self.eps = {}, None
        g = qmodel.module.graph
        nodes = {n.name: n for n in g.nodes}
        for m in graph.matmuls:
            node = nodes[m.node]
            fmts = [
                low_plan.weight_format(m) if p == m.weight_operand else low_plan.activation_format(m)
                for p in m.operands
            ]
            self.info[m.name] = (node.target, list(zip(m.operands, m.reduction_axes, fmts)), dict(node.kwargs))
            with g.inserting_after(node):
                tap = g.call_function(self._tap, (node, m.name, *node.args))
            node.replace_all_uses_with(tap, delete_user_cb=lambda user, tap=tap: user is not tap)
        g.lint()
        qmodel.module.recompile()

    def _tap(self, out, name, *args):
        if self.eps is None:
            return out
        op, operands, kwargs = self.info[name]
        low_args = list(args)
        for pos, axis, fmt in operands:
            low_args[pos] = _moved(args[pos].detach(), fmt, "nearest", axis)
        with torch.no_grad():
            low = op(*low_args, **kwargs)
        e = torch.zeros_like(out, requires_grad=True)
        self.eps.append((name, e))
        return out + e * (low - out).detach()

    def fisher(self, tapped, space, windows) -> dict[str, float]:
        component_of = {m.name: c.name for c in space.components for m in c.matmuls}
        total = dict.fromkeys((c.name for c in space.components), 0.0)
        with _frozen_parameters(tapped), torch.enable_grad():
            for window in windows:
                self.eps = []
                ids = window[None]
                loss = F.cross_entropy(tapped(ids)[0, :-1].float(), ids[0, 1:])
                grads = torch.autograd.grad(loss, [e for _, e in self.eps], allow_unused=True)
                for (name, _), d in zip(self.eps, grads):
                    if d is not None and name in component_of:
                        total[component_of[name]] += float(d.double().square().sum())
        self.eps = None
        return {n: 0.5 * v / len(windows) for n, v in total.items()}


def exchanges(x, fisher, g, lam, size, target, slack, steps=300):
    """Best-improvement exchanges on the covariance estimate from the plan ``x`` (bool array)."""
    linear = fisher - lam * 0.5 * np.mean(g**2, axis=0)
    x = x.copy()
    n = g.shape[0]
    for _ in range(steps):
        s = g[:, x].sum(1)
        low, high = np.where(x)[0], np.where(~x)[0]
        ga, gb = g[:, low], g[:, high]
        # mean_w (s - ga + gb)^2 - s^2, for every (low a, high b) pair
        quad = (
            np.mean(ga**2, 0)[:, None]
            + np.mean(gb**2, 0)[None, :]
            - 2 * (s @ ga / n)[:, None]
            + 2 * (s @ gb / n)[None, :]
            - 2 * (ga.T @ gb / n)
        )
        change = -linear[low][:, None] + linear[high][None, :] + lam * 0.5 * quad
        new_size = size[x].sum() - size[low][:, None] + size[high][None, :]
        change[(new_size < target - 1e-9) | (new_size > target + slack)] = np.inf
        i, j = np.unravel_index(np.argmin(change), change.shape)
        if change[i, j] >= -1e-12:
            break
        x[low[i]], x[high[j]] = False, True
    return x


def shared_input_fisher(qmodel, space, windows):
    """(diagonal, cross): the per-element Fisher with the consumers of one quantizer that share
    a component summed before squaring, and sum_e g_{a,e} g_{b,e} for consumers of one quantizer
    in components a < b. The estimate of a low set S is sum_{c in S} diagonal[c] plus
    sum_{a < b in S} cross[a, b]."""
    seen = []

    def per_element(c, out, site):
        e = torch.zeros_like(out, requires_grad=True)
        seen.append((c, site, e))
        return e

    diagonal, cross = defaultdict(float), defaultdict(float)
    with _flip_perturbations(qmodel, space, per_element):
        for window in windows:
            seen.clear()
            grads = torch.autograd.grad(_window_loss(qmodel, window), [e for *_, e in seen], allow_unused=True)
            by_site = defaultdict(dict)
            for (c, site, _), d in zip(seen, grads):
                if d is not None:
                    per = by_site[id(site)]
                    per[c] = per[c] + d.double() if c in per else d.double()
            for per in by_site.values():
                for c, d in per.items():
                    diagonal[c] += 0.5 * float(d.square().sum()) / len(windows)
                for (a, da), (b, db) in itertools.combinations(sorted(per.items()), 2):
                    cross[a, b] += float((da * db).sum()) / len(windows)
    return dict(diagonal), dict(cross)


def solve_pairwise(diagonal, cross, sizes, target):
    """The low set of least sum diagonal + sum of cross terms within it, sizes reaching target:
    y_ab = x_a x_b linearized (y >= x_a + x_b - 1, y <= x_a, y <= x_b)."""
    names = sorted(diagonal)
    index = {n: i for i, n in enumerate(names)}
    pairs = [(a, b) for a, b in cross if a in index and b in index]
    n, m = len(names), len(pairs)
    cost = np.concatenate([[diagonal[c] for c in names], [cross[p] for p in pairs]])
    cost = cost / np.abs(cost).max()
    rows, lb, ub = [np.concatenate([[sizes[c] for c in names], np.zeros(m)])], [target - 1e-9], [np.inf]
    for k, (a, b) in enumerate(pairs):
        for coef, lo, hi in (((1, 1, -1), -np.inf, 1), ((-1, 0, 1), -np.inf, 0), ((0, -1, 1), -np.inf, 0)):
            row = np.zeros(n + m)
            row[index[a]], row[index[b]], row[n + k] = coef
            rows.append(row), lb.append(lo), ub.append(hi)
    res = milp(
        cost,
        constraints=LinearConstraint(np.array(rows), lb, ub),
        integrality=np.ones(n + m),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0},
    )
    return [c for c, x in zip(names, res.x[:n]) if x > 0.5]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probe", choices=("output", "covariance", "shared"))
    ap.add_argument("--gradient-windows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    bench = search_setup.load(args.seed)
    graph, qmodel = bench.graph, bench.qmodel
    held_out, fisher_windows = bench.held_out(64), bench.windows("fisher", 4)  # search_quality.py's
    base = perplexity(qmodel, windows=held_out, progress=False)
    print(f"all-BF16 held-out perplexity {base:.3f} (64 x 128 tokens)", flush=True)
    low_p, high_p = search_precisions("mxint4", "bf16", weights_only=False)
    spaces = [SearchSpace(graph, g, low_p, high_p, mpqc.search.Budget("params", r)) for g, r in SETTINGS]
    if args.probe == "output":
        tapped = mpqc.compile(graph, mpqc.Plan.uniform(graph, "bf16"))
        taps = OutputTaps(tapped, graph, spaces[0].plan([c.name for c in spaces[0].components]))
    elif args.probe == "covariance":
        gradient_windows = sample_windows(
            bench.search_tokens, 128, args.gradient_windows, args.seed + 101, bench.prefix
        )
    by_granularity = {}

    def held(space, low):
        qmodel.set_plan(space.plan(sorted(low)))
        ppl = perplexity(qmodel, windows=held_out, progress=False)
        return f"{ppl:10.3f} {100 * (ppl / base - 1):8.1f}%"

    for (granularity, ratio), space in zip(SETTINGS, spaces):
        names = [c.name for c in space.variables()]
        sizes, target = space.sizes(), space.target()
        if granularity not in by_granularity:
            element = sensitivity(qmodel, space, fisher_windows, progress=False)
            if args.probe == "output":
                extra = taps.fisher(tapped, space, fisher_windows)
            elif args.probe == "shared":
                extra = shared_input_fisher(qmodel, space, fisher_windows)
            else:
                extra = window_gradients(qmodel, space, gradient_windows, progress=False)
            by_granularity[granularity] = element, extra
        element, extra = by_granularity[granularity]
        knapsack = solve_knapsack({n: element[n] for n in names}, {n: sizes[n] for n in names}, target)
        label = f"{granularity} {ratio}"
        print(f"{label:<12} knapsack    {held(space, knapsack)}", flush=True)
        if args.probe == "output":
            plan = solve_knapsack({n: extra[n] for n in names}, {n: sizes[n] for n in names}, target)
            print(f"{label:<12} output      {held(space, plan)}", flush=True)
            continue
        if args.probe == "shared":
            diagonal, cross = extra
            plan = solve_pairwise({n: diagonal[n] for n in names}, cross, sizes, target)
            changed = len(set(plan) ^ set(knapsack)) // 2
            print(f"{label:<12} shared      {held(space, plan)}  ({changed} exchanges)", flush=True)
            continue
        order = [c.name for c in space.components]
        g = extra[:, [order.index(n) for n in names]]
        size = np.array([sizes[n] for n in names])
        x0 = np.array([n in knapsack for n in names])
        slack = max(size[x0].sum() - target, 0.01 * target)
        for lam in (0.5, 1.0, 2.0):
            x = exchanges(x0, np.array([element[n] for n in names]), g, lam, size, target, slack)
            moved = int((x != x0).sum()) // 2
            low = [n for n, v in zip(names, x) if v]
            print(f"{label:<12} lam={lam:<4}    {held(space, low)}  ({moved} exchanges)", flush=True)


if __name__ == "__main__":
    main()
