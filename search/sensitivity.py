"""Per-component sensitivity: how much the loss is expected to rise when one component goes low.

A second-order estimate from one forward and backward pass per window, for every component
at once. Every quantizer's output (at the high precision) gets a term ``eps * delta``, where
``delta`` is what the low precision would change it by and ``eps`` is zero. With one ``eps``
per element, dL/d eps is each element's first-order loss change, and half the mean over
windows of the sum of their squares is the diagonal empirical-Fisher estimate of the loss
increase (``sensitivity``: the score NVIDIA ModelOpt's ``auto_quantize`` ranks by). With one
scalar ``eps`` per component, dL/d eps is the component's first-order change on a window,
signed, so sets of components have a joint estimate (``window_gradients``: the predictor's
features). Weights and activations both count, so attention matmuls (no weights) get a
sensitivity too.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mpqc.compile import QuantizedModel
from mpqc.formats import quantize

from .budget import SearchSpace


@contextlib.contextmanager
def _frozen_parameters(module: torch.nn.Module):
    # Only the eps scalars need gradients; parameter gradients would cost memory and time.
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _moved(x: torch.Tensor, fmt, rounding: str, axis: int) -> torch.Tensor:
    """``x`` in the activation format ``fmt`` (None: not quantized)."""
    if fmt is None:
        return x
    block = None if fmt.family == "cast" else fmt.block_size
    return quantize(x, fmt, block_size=block, axis=axis, rounding=rounding)


@contextlib.contextmanager
def _flip_perturbations(qmodel: QuantizedModel, space: SearchSpace, eps_for, at=()):
    """Hooks that add ``eps * (other - current)`` to every quantizer output of every component.

    The model runs at the plan whose low components are ``at`` (default: the all-high plan);
    "other" is the output at the component's other precision (low for a high component, high
    for a low one). ``eps_for(component, out, site)`` gives the multiplier: one zero scalar per
    component (all of its quantizers share it) or a zero tensor shaped like ``out`` (one per
    element); ``site`` is the quantizer module, which the consumers of one activation share.
    The previous plan is restored on exit."""
    graph = space.graph
    component_of = {m.name: c.name for c in space.components for m in c.matmuls}
    at = set(at)
    plan = space.plan(sorted(at))
    flipped = space.plan(sorted({c.name for c in space.components} - at))
    previous = qmodel.plan
    qmodel.set_plan(plan)
    handles = []
    for mname, wq in qmodel.weight_quantizers.items():
        m = graph.matmul(mname)
        other = flipped.weight_format(m)
        if other == plan.weight_format(m):
            continue
        c = component_of[mname]

        def hook(mod, inputs, out, other=other, c=c):
            moved = mod._cache.get(mod.weight_name, inputs[0], other, mod.axis, plan.rounding)
            return out + eps_for(c, out, mod) * (moved - out).detach()

        handles.append(wq.register_forward_hook(hook))
    for aq in qmodel.activation_quantizers:
        others = [flipped.activation_format(graph.matmul(n)) for n in aq.consumers]
        currents = [plan.activation_format(graph.matmul(n)) for n in aq.consumers]
        comps = [component_of.get(n) for n in aq.consumers]  # None: a component kept high

        def hook(mod, inputs, outs, others=others, currents=currents, comps=comps):
            x = inputs[0].detach()
            result = []
            for out, other, current, c in zip(outs, others, currents, comps):
                if c is None or other == current:
                    result.append(out)
                    continue
                moved = _moved(x, other, plan.rounding, mod.axis)
                result.append(out + eps_for(c, out, mod) * (moved - out.detach()))
            return tuple(result)

        handles.append(aq.register_forward_hook(hook))
    try:
        with _frozen_parameters(qmodel), torch.enable_grad():
            yield
    finally:
        for h in handles:
            h.remove()
        qmodel.set_plan(previous if previous is not None else plan)


def _window_loss(qmodel: QuantizedModel, window: torch.Tensor) -> torch.Tensor:
    ids = window[None].to(qmodel.graph.device)
    return F.cross_entropy(qmodel(ids)[0, :-1].float(), ids[0, 1:])


def window_gradients(
    qmodel: QuantizedModel, space: SearchSpace, windows: torch.Tensor, *, at=(), progress: bool = True
) -> np.ndarray:
    """g[w, c]: d loss(window w) / d eps_c, where eps_c scales what moving component c low changes
    (at the plan whose low components are ``at``: moving c to its other precision).

    One zero scalar per component multiplies the difference between the low and the high
    format at every quantizer of that component, so one backward pass per window gives the
    first-order loss change of every component at once. Float64 [n_windows, n_components] in
    ``space.components`` order; signed, so a set of components has the joint estimate
    ``0.5 * mean_w (sum_c g[w, c])^2``.
    """
    names = [c.name for c in space.components]
    eps = {n: torch.zeros((), device=space.graph.device, requires_grad=True) for n in names}
    g = np.zeros((len(windows), len(names)))
    with _flip_perturbations(qmodel, space, lambda c, out, site: eps[c], at):
        for w, window in enumerate(tqdm(windows, desc="sensitivity", unit="window", disable=not progress)):
            grads = torch.autograd.grad(_window_loss(qmodel, window), [eps[n] for n in names], allow_unused=True)
            g[w] = [0.0 if d is None else d.item() for d in grads]
    return g


def sensitivity(
    qmodel: QuantizedModel, space: SearchSpace, windows: torch.Tensor, *, at=(), progress: bool = True
) -> dict[str, float]:
    """Expected loss increase per component of ``space`` when only it goes low (the ranking
    the knapsack and the default strategy start from); with ``at``, the same estimate at the
    plan whose low components are ``at``, for moving each component to its other precision.

    The diagonal empirical-Fisher estimate NVIDIA ModelOpt's ``auto_quantize`` scores with:
    0.5 * mean over windows of sum over elements of (d loss / d x_e * delta x_e)^2, where x
    runs over every quantizer output of the component (its weights and its activations) and
    delta x is what the low format changes it by. ModelOpt takes the elements of each
    matmul's output instead of its operands; the estimate is the same kind. Unlike the square
    of one per-window sum (``window_gradients``), which rests on as many samples as there are
    windows, each element is a sample: on SmolLM2 with 4 windows it gave a knapsack plan of
    lower held-out perplexity (docs/search.md).
    """
    names = [c.name for c in space.components]
    seen: list[tuple[str, torch.Tensor]] = []

    def per_element(c, out, site):
        e = torch.zeros_like(out, requires_grad=True)
        seen.append((c, e))
        return e

    total = dict.fromkeys(names, 0.0)
    with _flip_perturbations(qmodel, space, per_element, at):
        for window in tqdm(windows, desc="sensitivity", unit="window", disable=not progress):
            seen.clear()
            grads = torch.autograd.grad(_window_loss(qmodel, window), [e for _, e in seen], allow_unused=True)
            for (c, _), d in zip(seen, grads):
                if d is not None:
                    total[c] += float(d.double().square().sum())
    return {n: 0.5 * total[n] / max(len(windows), 1) for n in names}


def priorities_from_sensitivity(sens: dict[str, float], sizes: dict[str, float]) -> dict[str, float]:
    """Priorities in [0, 1] that send the cheapest loss per unit of budget low first.

    Components of budget size zero buy nothing low, so they stay high (priority below 1/2)."""
    paying = [n for n in sens if sizes[n] > 0]
    ranked = sorted(paying, key=lambda n: (sens[n] / sizes[n], n))
    pr = {n: 1.0 - i / max(len(ranked), 1) for i, n in enumerate(ranked)}  # in (0, 1]
    for n in sens:
        if sizes[n] <= 0:
            pr[n] = 0.25
    return pr


def study_sensitivity(
    study, qmodel: QuantizedModel, space: SearchSpace, windows: torch.Tensor, *, at_low: bool = False, progress=True
) -> dict[str, float]:
    """The study's sensitivity of every component: computed once on ``windows`` (the search's
    Fisher windows: ``SearchConfig.windows(tokens, "fisher")``) and kept in the study, so
    restarts and other workers reuse it. ``at_low``: the estimate at the all-low plan instead
    (what restoring each component would change), kept as ``sensitivity_low``."""
    key = "sensitivity_low" if at_low else "sensitivity"
    stored = study.user_attrs.get(key)
    if stored is not None:
        return stored
    at = [c.name for c in space.components] if at_low else ()
    sens = sensitivity(qmodel, space, windows, at=at, progress=progress)
    study.set_user_attr(key, sens)
    return sens


def seed_study(study, space: SearchSpace, sens: dict[str, float], *, n_seeded: int, seed: int) -> None:
    """Enqueue the sensitivity ranking of the search variables and ``n_seeded - 1``
    perturbations of it as first trials (once per study: a resumed or shared study is not
    seeded again)."""
    if study.user_attrs.get("seeded"):
        return
    sizes = space.sizes()
    names = [c.name for c in space.variables()]
    base = priorities_from_sensitivity({n: sens[n] for n in names}, {n: sizes[n] for n in names})
    rng = torch.Generator().manual_seed(seed)
    for k in range(n_seeded):
        noise = 0.0 if k == 0 else 0.05 * k
        pr = {
            n: min(1.0, max(0.0, p + noise * (2 * torch.rand((), generator=rng).item() - 1))) for n, p in base.items()
        }
        study.enqueue_trial({f"p:{n}": v for n, v in pr.items()}, user_attrs={"seeded": True})
    study.set_user_attr("seeded", True)
