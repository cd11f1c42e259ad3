"""The cheap measurements of one compiled model, and every feature of any plan of it.

``Features`` measures once per model (all-high NLL, the per-window first-order loss changes of
every component, the weight-noise statistics) and then gives any plan's features without a
forward pass, except ``noise_rise`` (one forward on the probe windows). The feature names are
``MODEL_FEATURES`` (per model) and ``PLAN_FEATURES`` (per plan); see the package docstring.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from mpqc.compile import QuantizedModel
from mpqc.evaluate import nll
from mpqc.plan import Plan
from mpqc.search.budget import SearchSpace
from mpqc.search.sensitivity import window_gradients

__all__ = ["FEATURES", "MODEL_FEATURES", "PLAN_FEATURES", "Features", "fisher_gradients"]

MODEL_FEATURES = ("params", "nll_base", "noise_rise_all")
PLAN_FEATURES = ("ratio", "fisher", "fisher_diag", "first_order", "weight_noise", "noise_rise")
FEATURES = MODEL_FEATURES + PLAN_FEATURES


def fisher_gradients(
    qmodel: QuantizedModel, space: SearchSpace, windows: torch.Tensor, *, progress: bool = False
) -> np.ndarray:
    """g[w, c]: the first-order loss change on window w of moving component c low, all at once.

    search/sensitivity.py's construction with one scalar per component, kept per window and
    signed: ``0.5 * mean_w g[w, c]^2`` is component c's own estimate (the ``fisher_diag``
    feature) and any set of components has its joint estimate
    ``0.5 * mean_w (sum_c g[w, c])^2``. (The search ranks by the per-element estimate,
    ``sensitivity``, instead.) Float64 [n_windows, n_components] in ``space.components`` order.
    """
    return window_gradients(qmodel, space, windows, progress=progress)


class Features:
    """The cheap measurements of one compiled model, and the features of any plan of it.

    ``windows``: calibration windows [n, seq_len] (text the evaluation never sees); the first
    ``probe_samples`` of them are the probe windows of the noise measurements (0: no
    ``noise_rise`` feature, no forward per plan). ``noise_seed`` seeds the Gaussian weight noise.
    """

    def __init__(
        self,
        qmodel: QuantizedModel,
        space: SearchSpace,
        windows: torch.Tensor,
        *,
        probe_samples: int = 2,
        batch_size: int = 8,
        noise_seed: int = 0,
        progress: bool = False,
    ):
        if not isinstance(probe_samples, int) or not 0 <= probe_samples <= len(windows):
            raise ValueError(
                f"probe_samples must be an int in [0, {len(windows)}] (the calibration windows), got {probe_samples!r}"
            )
        self.qmodel, self.space, self.windows = qmodel, space, windows
        self.graph = space.graph
        self.names = [c.name for c in space.components]
        self._index = {n: i for i, n in enumerate(self.names)}
        self.batch_size = batch_size
        self.probe = windows[:probe_samples]
        self.high_plan = space.plan([])
        self.params = sum(p.numel() for p in self.graph.module.parameters())
        self._low_plan = space.plan(self.names)
        self._noise_seed = noise_seed
        self._noise: dict[str, torch.Tensor] = {}  # matmul -> unit Gaussian, drawn once
        previous = qmodel.plan
        try:
            qmodel.set_plan(self.high_plan)
            self.nll_base = nll(qmodel, windows=windows, batch_size=batch_size, progress=False)
            self.g = fisher_gradients(qmodel, space, windows, progress=progress)
            self.sensitivity = dict(zip(self.names, 0.5 * np.mean(self.g**2, axis=0)))
            self._weight_stats()
            self.nll_probe = (
                nll(qmodel, windows=self.probe, batch_size=batch_size, progress=False) if len(self.probe) else math.nan
            )
            self.noise_rise_all = self._noise_rise(self.names)
        finally:
            qmodel.set_plan(previous if previous is not None else self.high_plan)

    # -- per model --------------------------------------------------------------------------------
    def _weight_stats(self) -> None:
        """Per matmul: the RMS of q_low(W) - q_high(W); per component: that noise's energy."""
        cache, rounding = self.qmodel.weight_cache, self.high_plan.rounding
        self._sigma: dict[str, float] = {}
        self._energy = np.zeros(len(self.names))
        total = 0.0
        component_of = {m.name: c.name for c in self.space.components for m in c.matmuls}
        for mname, wq in self.qmodel.weight_quantizers.items():
            m = self.graph.matmul(mname)
            w = self.qmodel.weight(m.name)
            high = cache.get(wq.weight_name, w, self.high_plan.weight_format(m), wq.axis, rounding)
            low = cache.get(wq.weight_name, w, self._low_plan.weight_format(m), wq.axis, rounding)
            sq = float(((low.detach().double() - high.detach().double()) ** 2).sum())
            self._sigma[mname] = math.sqrt(sq / max(w.numel(), 1))
            if m.params:  # a shared weight counts once, at its owner
                if mname in component_of:  # not kept high (keep_high): a plan can put it low
                    self._energy[self._index[component_of[mname]]] += sq
                total += float((w.detach().double() ** 2).sum())
        self._weight_total = total

    def _unit_noise(self, mname: str, like: torch.Tensor) -> torch.Tensor:
        noise = self._noise.get(mname)
        if noise is None:
            seed = int(hashlib.sha256(f"{self._noise_seed}:{mname}".encode()).hexdigest()[:8], 16)
            gen = torch.Generator().manual_seed(seed)
            noise = torch.randn(like.shape, generator=gen, dtype=torch.float32).to(like.device, like.dtype)
            self._noise[mname] = noise
        return noise

    def _noise_rise(self, low: Sequence[str]) -> float:
        """NLL rise on the probe windows with Gaussian noise on the low components' weights."""
        if not len(self.probe):
            return math.nan
        low = set(low)
        handles = []
        for c in self.space.components:
            if c.name not in low:
                continue
            for m in c.matmuls:
                wq = self.qmodel.weight_quantizers.get(m.name)
                sigma = self._sigma.get(m.name, 0.0)
                if wq is None or sigma == 0.0:
                    continue

                def hook(mod, inputs, out, mname=m.name, sigma=sigma):
                    return out + sigma * self._unit_noise(mname, out)

                handles.append(wq.register_forward_hook(hook))
        if not handles:
            return 0.0
        previous = self.qmodel.plan
        try:
            self.qmodel.set_plan(self.high_plan)
            value = nll(self.qmodel, windows=self.probe, batch_size=self.batch_size, progress=False)
        finally:
            for h in handles:
                h.remove()
            self.qmodel.set_plan(previous if previous is not None else self.high_plan)
        return value - self.nll_probe

    def model_features(self) -> dict:
        return {"params": self.params, "nll_base": self.nll_base, "noise_rise_all": self.noise_rise_all}

    # -- per plan ---------------------------------------------------------------------------------
    def low_components(self, plan: Plan) -> list[str]:
        """The components ``plan`` puts at the low precision; every other must be at the high one."""
        if plan.graph is not self.graph:
            raise ValueError("the plan was made for another captured graph")
        if plan.granularity_label != self.high_plan.granularity_label or plan.block_size != self.space.block_size:
            raise ValueError(
                f"the plan's granularity/block size ({plan.granularity_label}, {plan.block_size}) are not "
                f"the features' ({self.high_plan.granularity_label}, {self.space.block_size})"
            )
        low, bad = [], []
        for c in self.space.components:
            p = plan.precision(c.name)
            if p == self.space.low_of(c):
                low.append(c.name)
            elif p != self.space.high_of(c):
                bad.append(f"{c.name}: {p}")
        if bad:
            raise ValueError(
                f"the features are for plans of {self.space.low_label} (low) and {self.space.high_label} (high); "
                f"the plan has {len(bad)} components at other precisions, e.g. {', '.join(bad[:3])}"
            )
        return low

    def features(self, plan_or_low: Plan | Iterable[str], *, probe: bool = True) -> dict:
        """Every feature of the plan (a Plan, or the names of its low components)."""
        low = self.low_components(plan_or_low) if isinstance(plan_or_low, Plan) else list(plan_or_low)
        unknown = [n for n in low if n not in self._index]
        if unknown:
            raise KeyError(f"unknown components {unknown[:3]}; the features' components are e.g. {self.names[:3]}")
        z = np.zeros(len(self.names))
        z[[self._index[n] for n in low]] = 1.0
        per_window = self.g @ z
        plan = self.space.plan(low)
        return {
            **self.model_features(),
            "ratio": plan.quantization_ratio("params"),
            "fisher": float(0.5 * np.mean(per_window**2)),
            "fisher_diag": float(sum(self.sensitivity[n] for n in low)),
            "first_order": float(np.mean(per_window)),
            "weight_noise": float(self._energy @ z / self._weight_total) if self._weight_total else 0.0,
            "noise_rise": self._noise_rise(low) if probe else math.nan,
        }
