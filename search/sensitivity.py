"""Per-component sensitivity: how much the loss is expected to rise when one component goes low.

A second-order estimate from one forward and backward pass per window, for every component
at once. Every quantizer's output (at the high precision) gets a term ``eps_c * delta``,
where ``delta`` is what the low precision would change it by and ``eps_c`` is one zero
scalar per component. Then dL/d eps_c is the first-order loss change of moving component c
low on that window, and half the mean of its square over windows is the empirical-Fisher
estimate of the expected loss increase, 0.5 * delta^T F delta. Weights and activations
both count, so attention matmuls (no weights) get a sensitivity too.
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


def _delta_weight(quantizer, low_fmt, rounding, weight, out):
    low = quantizer._cache.get(quantizer.weight_name, weight, low_fmt, quantizer.axis, rounding)
    return low - out


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


def window_gradients(
    qmodel: QuantizedModel, space: SearchSpace, windows: torch.Tensor, *, progress: bool = True
) -> np.ndarray:
    """g[w, c]: d loss(window w) / d eps_c, where eps_c scales what moving component c low changes.

    One zero scalar per component multiplies the difference between the low and the high
    format at every quantizer of that component, so one backward pass per window gives the
    first-order loss change of every component at once. Float64 [n_windows, n_components] in
    ``space.components`` order; signed, so a set of components has the joint estimate
    ``0.5 * mean_w (sum_c g[w, c])^2``.
    """
    graph = space.graph
    component_of = {m.name: c.name for c in space.components for m in c.matmuls}
    names = [c.name for c in space.components]
    eps = {n: torch.zeros((), device=graph.device, requires_grad=True) for n in names}
    high_plan, low_plan = space.plan([]), space.plan(names)
    previous = qmodel.plan
    qmodel.set_plan(high_plan)
    handles = []
    for mname, wq in qmodel.weight_quantizers.items():
        m = graph.matmul(mname)
        low_fmt = low_plan.weight_format(m)
        if low_fmt == high_plan.weight_format(m):
            continue
        c = component_of[mname]

        def hook(mod, inputs, out, low_fmt=low_fmt, c=c):
            return out + eps[c] * _delta_weight(mod, low_fmt, low_plan.rounding, inputs[0], out).detach()

        handles.append(wq.register_forward_hook(hook))
    for aq in qmodel.activation_quantizers:
        lows = [low_plan.activation_format(graph.matmul(n)) for n in aq.consumers]
        highs = [high_plan.activation_format(graph.matmul(n)) for n in aq.consumers]
        comps = [component_of.get(n) for n in aq.consumers]  # None: a component kept high

        def hook(mod, inputs, outs, lows=lows, highs=highs, comps=comps):
            x = inputs[0]
            result = []
            for out, fmt, high, c in zip(outs, lows, highs, comps):
                if fmt is None or fmt == high:
                    result.append(out)
                    continue
                block = None if fmt.family == "cast" else fmt.block_size
                low = quantize(x.detach(), fmt, block_size=block, axis=mod.axis, rounding=low_plan.rounding)
                result.append(out + eps[c] * (low - out.detach()))
            return tuple(result)

        handles.append(aq.register_forward_hook(hook))
    g = np.zeros((len(windows), len(names)))
    try:
        with _frozen_parameters(qmodel), torch.enable_grad():
            for w, window in enumerate(tqdm(windows, desc="sensitivity", unit="window", disable=not progress)):
                ids = window[None].to(graph.device)
                logits = qmodel(ids)
                loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
                grads = torch.autograd.grad(loss, [eps[n] for n in names], allow_unused=True)
                g[w] = [0.0 if d is None else d.item() for d in grads]
    finally:
        for h in handles:
            h.remove()
        qmodel.set_plan(previous if previous is not None else high_plan)
    return g


def sensitivity(
    qmodel: QuantizedModel, space: SearchSpace, windows: torch.Tensor, *, progress: bool = True
) -> dict[str, float]:
    """Expected loss increase (nats per token) per component of ``space`` when only it goes low:
    the empirical Fisher estimate 0.5 * mean over windows of the squared first-order change."""
    g = window_gradients(qmodel, space, windows, progress=progress)
    return {c.name: float(0.5 * np.mean(g[:, i] ** 2)) for i, c in enumerate(space.components)}


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
    study,
    qmodel: QuantizedModel,
    space: SearchSpace,
    tokens: torch.Tensor,
    *,
    seq_len: int,
    n_windows: int,
    seed: int,
    prefix=(),
    progress: bool = True,
) -> dict[str, float]:
    """The study's sensitivity of every component: computed once (``n_windows`` windows of the
    search text, seed + 1) and kept in the study, so restarts and other workers reuse it."""
    from mpqc.evaluate import sample_windows

    stored = study.user_attrs.get("sensitivity")
    if stored is not None:
        return stored
    windows = sample_windows(tokens, seq_len, n_windows, seed + 1, prefix)
    sens = sensitivity(qmodel, space, windows, progress=progress)
    study.set_user_attr("sensitivity", sens)
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
