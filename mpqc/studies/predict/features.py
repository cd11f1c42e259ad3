"""Predicting a plan's delta_ppl from cheap measurements (after Xu et al. 2024, for mixed plans).

Xu et al. predict the quality of a post-training-quantized LLM with a statistical model of a
few factors: model size, the unquantized NLL, and the local loss landscape (how the loss rises
under weight noise of the quantizer's size). Here the same idea is applied to a mixed plan:
which components of one model go to the low format. Every measurement below is cheaper than
evaluating the plan, and all but one need no forward pass per plan at all.

Per model (once):

* ``params``: all parameters of the model (the regression uses its logarithm);
* ``nll_base``: the all-high NLL (nats per token) on calibration windows;
* ``noise_rise_all``: the NLL rise on the probe windows when every matmul weight gets Gaussian
  noise of the low format's size (per tensor: the RMS of q(W) - W); Xu's landscape factor.

Per plan (from one backward pass per calibration window, shared by every plan):

* ``ratio``: Q_r by parameters;
* ``fisher_diag``: the sum over the plan's low components of search/sensitivity.py's
  empirical-Fisher estimate (each component alone, cross terms ignored);
* ``fisher``: the same estimate for the plan's low components together, 0.5 * mean over windows
  of (sum of their first-order loss changes)^2, cross terms included. The per-window, per-
  component first-order changes g[w, c] come from one backward pass per window, so any plan's
  value is a dot product: no forward per plan;
* ``first_order``: mean over windows of that sum (the linear term of the loss change);
* ``weight_noise``: sum over the low weights of ||q(W) - W||^2 over sum over all matmul
  weights of ||W||^2: the plan's relative weight-noise energy (from the cached quantized weights);

and, with probe windows, one forward per plan:

* ``noise_rise``: the NLL rise on the probe windows with Gaussian weight noise of the low
  format's size on the plan's low components only (activations stay high). The noise of each
  weight is drawn once and reused by every plan, so plans differ only in where noise is.

The target is delta NLL = ln(ppl_q / ppl_base) = ln(1 + delta_ppl). The predictor is one
linear least-squares fit of ln(delta NLL) on a few terms, each a feature or its logarithm
(``"log(fisher)"``, ``"nll_base"``): a power law in the features, explainable by its
coefficients. It predicts delta_ppl = exp(exp(fit)) - 1.

    rows = mpqc.studies.predict.collect(graph, search_tokens, holdout, model="smollm2", n_plans=40)
    predictor = mpqc.studies.predict.Predictor.fit(rows, terms=mpqc.studies.predict.DEFAULT_TERMS)
    predictor.predict(rows)                                   # delta_ppl per row
    mpqc.studies.predict.validate(rows, by="plans")                   # held-out plans: R^2, MAE, Spearman
    mpqc.studies.predict.validate(rows_of_several_models, by="models")  # leave one model out
    mpqc.studies.predict.write_data("data.csv", rows); mpqc.studies.predict.read_data("data.csv")
    predictor.save("predictor.json"); mpqc.studies.predict.Predictor.load("predictor.json")
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from mpqc.compile import QuantizedModel
from mpqc.io import json_safe, read_csv, typed_rows, write_csv_atomic
from mpqc.evaluate import nll, sample_windows
from mpqc.graph import Graph
from mpqc.plan import Plan
from mpqc.search.budget import Budget, SearchSpace, decode, low_precision
from mpqc.search.sensitivity import priorities_from_sensitivity, window_gradients

__all__ = [
    "COLUMNS", "DEFAULT_TERMS", "FEATURES", "Features", "Predictor", "collect", "fisher_gradients", "metrics",
    "read_data", "validate", "write_data",
]

MODEL_FEATURES = ("params", "nll_base", "noise_rise_all")
PLAN_FEATURES = ("ratio", "fisher", "fisher_diag", "first_order", "weight_noise", "noise_rise")
FEATURES = MODEL_FEATURES + PLAN_FEATURES
# Chosen on the measurements in docs/scaling.md ("Prediction"): the summed per-component Fisher
# estimate alone ranks plans best, needs no forward per plan, and carries over between models best;
# Q_r, the noise probe and the model-level factors add little within a model and extrapolate badly.
DEFAULT_TERMS = ("log(fisher_diag)",)
LOG_FLOOR = 1e-6  # log(x) of a feature or target below this (noise: a loss change <= 0) uses this
SIMILAR_RATIO = 0.05  # plans this close in Q_r count as "the same budget" when scoring the ranking

COLUMNS = (
    "model", "setup", "plan_id", "source", "granularity", "low", "high", "weights_only", "block_size",
    "target_ratio", "n_low", *FEATURES, "ppl_base", "ppl_q", "delta_ppl", "dnll",
    "calib_samples", "probe_samples", "eval_samples", "seq_len", "seed", "feature_seconds", "eval_seconds",
    "low_components",
)
_STR = {"model", "setup", "source", "granularity", "low", "high", "block_size", "low_components"}
_INT = {"plan_id", "n_low", "params", "calib_samples", "probe_samples", "eval_samples", "seq_len", "seed"}


# ---- measurements -------------------------------------------------------------------------------


def fisher_gradients(qmodel: QuantizedModel, space: SearchSpace, windows: torch.Tensor, *,
                     progress: bool = False) -> np.ndarray:
    """g[w, c]: the first-order loss change on window w of moving component c low, all at once.

    search/sensitivity.py's construction, kept per window and signed: ``0.5 * mean_w g[w, c]^2``
    is exactly ``sensitivity()[c]`` and any set of components has its joint estimate
    ``0.5 * mean_w (sum_c g[w, c])^2``. Float64 [n_windows, n_components] in
    ``space.components`` order.
    """
    return window_gradients(qmodel, space, windows, progress=progress)


class Features:
    """The cheap measurements of one compiled model, and the features of any plan of it.

    ``windows``: calibration windows [n, seq_len] (text the evaluation never sees); the first
    ``probe_samples`` of them are the probe windows of the noise measurements (0: no
    ``noise_rise`` feature, no forward per plan). ``noise_seed`` seeds the Gaussian weight noise.
    """

    def __init__(self, qmodel: QuantizedModel, space: SearchSpace, windows: torch.Tensor, *,
                 probe_samples: int = 2, batch_size: int = 8, noise_seed: int = 0, progress: bool = False):
        if not isinstance(probe_samples, int) or not 0 <= probe_samples <= len(windows):
            raise ValueError(f"probe_samples must be an int in [0, {len(windows)}] (the calibration windows), "
                             f"got {probe_samples!r}")
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
            self.sensitivity = dict(zip(self.names, 0.5 * np.mean(self.g ** 2, axis=0)))
            self._weight_stats()
            self.nll_probe = nll(qmodel, windows=self.probe, batch_size=batch_size, progress=False) if len(self.probe) else math.nan
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
            raise ValueError(f"the plan's granularity/block size ({plan.granularity_label}, {plan.block_size}) are not "
                             f"the features' ({self.high_plan.granularity_label}, {self.space.block_size})")
        low, bad = [], []
        for c in self.space.components:
            p = plan.precision(c.name)
            if p == self.space.low:
                low.append(c.name)
            elif p != self.space.high:
                bad.append(f"{c.name}: {p}")
        if bad:
            raise ValueError(f"the features are for plans of {self.space.low} (low) and {self.space.high} (high); "
                             f"the plan has {len(bad)} components at other precisions, e.g. {', '.join(bad[:3])}")
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
            "fisher": float(0.5 * np.mean(per_window ** 2)),
            "fisher_diag": float(sum(self.sensitivity[n] for n in low)),
            "first_order": float(np.mean(per_window)),
            "weight_noise": float(self._energy @ z / self._weight_total) if self._weight_total else 0.0,
            "noise_rise": self._noise_rise(low) if probe else math.nan,
        }


# ---- data collection ----------------------------------------------------------------------------


def _setup_key(setup: Mapping) -> str:
    return hashlib.sha256(json.dumps(dict(setup), sort_keys=True, default=str).encode()).hexdigest()[:12]


def sample_plans(space: SearchSpace, n_plans: int, *, seed: int = 0, ratio_range=(0.2, 1.0),
                 guided_fraction: float = 0.3, sensitivity: Mapping[str, float] | None = None) -> list[dict]:
    """``n_plans`` distinct plans (as low component lists) with Q_r drawn uniformly from ``ratio_range``.

    Each plan is decoded from priorities (``mpqc.search.decode``, so it meets its ratio with
    least overshoot): uniform random priorities ("random"), or, with ``sensitivity`` and
    probability ``guided_fraction``, the sensitivity ranking plus uniform noise of a random
    amplitude in [0.02, 0.3] ("guided": plans a search would try). Plan i depends only on
    (seed, i), so a longer list starts with a shorter one."""
    lo, hi = ratio_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"ratio_range must satisfy 0 <= low <= high <= 1, got {ratio_range!r}")
    sizes = dataclasses.replace(space, budget=Budget("params", 0.0)).sizes()
    names = [c.name for c in space.components]
    base = priorities_from_sensitivity(sensitivity, sizes) if sensitivity is not None else None
    plans, seen, i = [], set(), 0
    while len(plans) < n_plans and i < 50 * n_plans + 100:
        rng = np.random.default_rng([seed, i])
        target = float(rng.uniform(lo, hi))
        guided = base is not None and rng.random() < guided_fraction
        if guided:
            amp = rng.uniform(0.02, 0.3)
            pr = {n: float(np.clip(base[n] + amp * rng.uniform(-1, 1), 0, 1)) for n in names}
        else:
            pr = {n: float(u) for n, u in zip(names, rng.uniform(0, 1, len(names)))}
        low = decode(pr, sizes, target)
        key = frozenset(low)
        if key not in seen:
            seen.add(key)
            plans.append({"plan_id": i, "source": "guided" if guided else "random", "target_ratio": target,
                          "low": sorted(low, key=names.index)})
        i += 1
    return plans


def collect(graph: Graph, search_tokens: torch.Tensor, holdout_tokens: torch.Tensor, *, model: str,
            n_plans: int = 40, low: str = "mxint4", high: str = "bf16", weights_only: bool = False,
            granularity: str = "matmul", block_size=None, seq_len: int = 128, calib_samples: int = 4,
            probe_samples: int = 2, eval_samples: int = 8, batch_size: int = 8, seed: int = 0,
            ratio_range=(0.2, 1.0), guided_fraction: float = 0.3, search_trials: int = 0,
            search_ratios: Sequence[float] = (0.5, 0.9), qmodel: QuantizedModel | None = None,
            existing: Sequence[Mapping] = (), on_row=None, progress: bool = True,
            prefix: Sequence[int] = ()) -> list[dict]:
    """Rows of (features, measured delta_ppl) for sampled plans of one model.

    Features come from ``calib_samples`` windows of ``search_tokens`` (the first
    ``probe_samples`` of them probe the noise); delta_ppl is measured on ``eval_samples``
    windows of ``holdout_tokens`` against the all-``high`` plan. Plans: ``sample_plans`` and,
    with ``search_trials``, every distinct trial of a short sensitivity-seeded search at each
    of ``search_ratios``. Rows of ``existing`` with the same model and setup are not measured
    again (resume); ``on_row(rows)`` is called with all rows so far after each new one.
    ``prefix``: the token ids every window opens with (``mpqc.data.text_prefix``: a BOS).
    """
    import mpqc

    low_p, high_p = low_precision(low, high, weights_only=weights_only)
    space = SearchSpace(graph, granularity, low_p, high_p, Budget("params", 0.0), block_size)
    setup = {"low": low, "high": high, "weights_only": weights_only, "granularity": granularity,
             "block_size": block_size, "seq_len": seq_len, "calib_samples": calib_samples,
             "probe_samples": probe_samples, "eval_samples": eval_samples, "seed": seed,
             "ratio_range": list(ratio_range), "guided_fraction": guided_fraction, "search_trials": search_trials,
             "search_ratios": list(search_ratios)}
    prefix = [int(t) for t in prefix]
    if prefix:  # only then: data collected before windows had prefixes keep their keys
        setup["prefix"] = prefix
    key = _setup_key(setup)
    rows = [dict(r) for r in existing]
    done = {int(r["plan_id"]) for r in rows if r["model"] == model and r["setup"] == key}
    qmodel = qmodel or mpqc.compile(graph, space.plan([]))
    calib = sample_windows(search_tokens, seq_len, calib_samples, seed + 1, prefix)
    evals = sample_windows(holdout_tokens, seq_len, eval_samples, seed + 2, prefix)
    t0 = time.perf_counter()
    feats = Features(qmodel, space, calib, probe_samples=probe_samples, batch_size=batch_size, noise_seed=seed,
                     progress=progress)
    model_seconds = time.perf_counter() - t0
    qmodel.set_plan(space.plan([]))
    nll_base_eval = nll(qmodel, windows=evals, batch_size=batch_size, progress=False)
    plans = sample_plans(space, n_plans, seed=seed, ratio_range=ratio_range, guided_fraction=guided_fraction,
                         sensitivity=feats.sensitivity)
    if search_trials:
        plans += _search_plans(graph, search_tokens, space, qmodel, plans, low=low, high=high,
                               weights_only=weights_only, granularity=granularity, block_size=block_size,
                               trials=search_trials, ratios=search_ratios, seq_len=seq_len,
                               n_samples=calib_samples, batch_size=batch_size, seed=seed, prefix=prefix)
    todo = [p for p in plans if p["plan_id"] not in done]
    for p in tqdm(todo, desc=f"collect {model}", unit="plan", disable=not progress):
        t1 = time.perf_counter()
        f = feats.features(p["low"])
        t2 = time.perf_counter()
        qmodel.set_plan(space.plan(p["low"]))
        nll_q = nll(qmodel, windows=evals, batch_size=batch_size, progress=False)
        t3 = time.perf_counter()
        dnll = nll_q - nll_base_eval
        rows.append({
            "model": model, "setup": key, "plan_id": p["plan_id"], "source": p["source"],
            "granularity": granularity, "low": low, "high": high, "weights_only": weights_only,
            "block_size": "default" if block_size is None else str(block_size), "target_ratio": p["target_ratio"],
            "n_low": len(p["low"]), **f, "ppl_base": math.exp(nll_base_eval), "ppl_q": math.exp(min(nll_q, 709.0)),
            "delta_ppl": math.expm1(min(dnll, 709.0)), "dnll": dnll, "calib_samples": calib_samples,
            "probe_samples": probe_samples, "eval_samples": eval_samples, "seq_len": seq_len, "seed": seed,
            "feature_seconds": round(t2 - t1 + model_seconds / max(len(plans), 1), 4),
            "eval_seconds": round(t3 - t2, 4), "low_components": ";".join(p["low"]),
        })
        if on_row is not None:
            on_row(rows)
    qmodel.set_plan(space.plan([]))
    return rows


def _search_plans(graph, tokens, space, qmodel, existing, *, low, high, weights_only, granularity, block_size,
                  trials, ratios, seq_len, n_samples, batch_size, seed, prefix=()) -> list[dict]:
    import mpqc

    seen = {frozenset(p["low"]) for p in existing}
    names = [c.name for c in space.components]
    out = []
    for k, r in enumerate(ratios):
        result = mpqc.search.run(graph, tokens, ratio=r, granularity=granularity, low=low, high=high,
                                 weights_only=weights_only, sampler="sensitivity", n_trials=trials, seq_len=seq_len,
                                 n_samples=n_samples, batch_size=batch_size, seed=seed, block_size=block_size,
                                 qmodel=qmodel, progress=False, prefix=tuple(prefix))
        for t in result.study.trials:
            chosen = t.user_attrs.get("low")
            if t.state.name != "COMPLETE" or chosen is None or frozenset(chosen) in seen:
                continue
            seen.add(frozenset(chosen))
            # ids past any sampled plan's, stable for the same settings
            out.append({"plan_id": 1_000_000 + 1000 * k + t.number, "source": "search", "target_ratio": r,
                        "low": sorted(chosen, key=names.index)})
    return out


def write_data(path: str, rows: Sequence[Mapping]) -> None:
    """The rows as CSV (columns ``COLUMNS``), written atomically."""
    write_csv_atomic(path, rows, COLUMNS)


def read_data(path: str) -> list[dict]:
    """Rows written by ``write_data`` / ``mpqc predict collect``, with typed values."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"prediction data {path} does not exist; write it with `mpqc predict collect`")
    header, raw = read_csv(path)
    missing = [c for c in ("model", "delta_ppl") if c not in header]
    if missing:
        raise ValueError(f"{path} lacks columns {missing}; expected the columns of `mpqc predict collect` "
                         f"({', '.join(COLUMNS)})")
    kinds = {**{k: "str" for k in _STR}, **{k: "int" for k in _INT}, "weights_only": "bool"}
    rows = typed_rows(raw, kinds, default="float", where=path)
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


# ---- the predictor ------------------------------------------------------------------------------

_TERM = re.compile(r"^(log\()?([a-z_]+)(\))?$")


def parse_term(term: str) -> tuple[bool, str]:
    m = _TERM.match(term.strip())
    if not m or bool(m.group(1)) != bool(m.group(3)):
        raise ValueError(f"a term is a feature name or log(name), e.g. 'log(fisher)' or 'nll_base'; got {term!r}")
    return bool(m.group(1)), m.group(2)


def design(rows: Sequence[Mapping], terms: Sequence[str]) -> np.ndarray:
    """The regression's columns: each term's value per row (log terms floored at LOG_FLOOR)."""
    cols = []
    for term in terms:
        is_log, name = parse_term(term)
        values = []
        for i, r in enumerate(rows):
            if name not in r:
                raise ValueError(f"term {term!r} needs feature {name!r}, which row {i} lacks; "
                                 f"features: {', '.join(k for k in r if k in FEATURES) or 'none'}")
            v = float(r[name])
            if not math.isfinite(v):
                raise ValueError(f"term {term!r}: feature {name!r} of row {i} (model {r.get('model')!r}, plan "
                                 f"{r.get('plan_id')!r}) is {v}; was it measured (e.g. noise_rise needs probe windows)?")
            values.append(math.log(max(v, LOG_FLOOR)) if is_log else v)
        cols.append(values)
    return np.asarray(cols, dtype=float).T.reshape(len(rows), len(terms))


def _target(rows: Sequence[Mapping]) -> np.ndarray:
    y = []
    for i, r in enumerate(rows):
        d = float(r["delta_ppl"])
        if not math.isfinite(d) or d <= -1:
            raise ValueError(f"row {i}: delta_ppl {d} is not a finite number above -1")
        y.append(math.log1p(d))
    return np.asarray(y)


@dataclasses.dataclass(frozen=True)
class Predictor:
    """ln(delta NLL) = intercept + sum_i coef_i * term_i; delta_ppl = exp(delta NLL) - 1.

    ``unused``: terms that were constant in the training data (e.g. model-level features when
    fitting one model); they get coefficient 0. ``setup``: how the features were measured
    (``mpqc predict plan`` measures new plans the same way)."""

    terms: tuple[str, ...]
    intercept: float
    coef: tuple[float, ...]
    coef_err: tuple[float, ...]
    intercept_err: float
    unused: tuple[str, ...] = ()
    n: int = 0
    dropped: int = 0  # training rows with delta NLL <= LOG_FLOOR (no logarithm), left out of the fit
    r2_log: float = math.nan  # in-sample, of ln(delta NLL)
    residual_std: float = math.nan
    models: tuple[str, ...] = ()
    setup: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def fit(cls, rows: Sequence[Mapping], terms: Sequence[str] = DEFAULT_TERMS, *, setup: Mapping | None = None) -> "Predictor":
        terms = tuple(terms)
        if not terms:
            raise ValueError("give at least one term, e.g. 'log(fisher)'")
        for t in terms:
            parse_term(t)
        if len(set(terms)) != len(terms):
            raise ValueError(f"terms repeat: {list(terms)}")
        rows = list(rows)
        dnll = _target(rows)
        keep = dnll > LOG_FLOOR
        x, y = design(rows, terms)[keep], np.log(dnll[keep])
        used = [j for j in range(len(terms)) if x.shape[0] and np.ptp(x[:, j]) > 1e-12 * max(1.0, np.abs(x[:, j]).max())]
        p = len(used) + 1
        if x.shape[0] < p + 2:
            raise ValueError(f"{x.shape[0]} usable rows (delta NLL > {LOG_FLOOR:g}) for {p} coefficients; "
                             f"need at least {p + 2}: collect more plans or use fewer terms")
        a = np.column_stack([np.ones(x.shape[0]), x[:, used]])
        beta, *_ = np.linalg.lstsq(a, y, rcond=None)
        resid = y - a @ beta
        dof = x.shape[0] - p
        s2 = float(resid @ resid) / dof
        try:
            cov = s2 * np.linalg.inv(a.T @ a)
            err = np.sqrt(np.clip(np.diag(cov), 0, None))
        except np.linalg.LinAlgError:
            err = np.full(p, math.nan)
        coef, coef_err = [0.0] * len(terms), [math.nan] * len(terms)
        for k, j in enumerate(used):
            coef[j], coef_err[j] = float(beta[k + 1]), float(err[k + 1])
        ss_tot = float(((y - y.mean()) ** 2).sum())
        return cls(terms=terms, intercept=float(beta[0]), coef=tuple(coef), coef_err=tuple(coef_err),
                   intercept_err=float(err[0]), unused=tuple(terms[j] for j in range(len(terms)) if j not in used),
                   n=int(keep.sum()), dropped=int((~keep).sum()),
                   r2_log=1.0 - float(resid @ resid) / ss_tot if ss_tot > 0 else math.nan,
                   residual_std=math.sqrt(s2), models=tuple(sorted({str(r.get("model", "")) for r in rows})),
                   setup=dict(setup or {}))

    def predict_log_dnll(self, rows: Sequence[Mapping]) -> np.ndarray:
        return self.intercept + design(list(rows), self.terms) @ np.asarray(self.coef)

    def predict(self, rows: Sequence[Mapping]) -> np.ndarray:
        """Predicted delta_ppl per row."""
        return np.expm1(np.exp(np.minimum(self.predict_log_dnll(rows), math.log(700.0))))

    def describe(self) -> str:
        lines = [f"ln(delta NLL) = {self.intercept:+.4f} (± {self.intercept_err:.4f})"]
        for t, c, e in zip(self.terms, self.coef, self.coef_err):
            lines.append(f"    {c:+.4f} (± {e:.4f}) * {t}" + ("   [constant in the data: not used]" if t in self.unused else ""))
        lines.append(f"fitted on {self.n} plans of {len(self.models)} model(s)"
                     + (f" ({self.dropped} with delta NLL <= {LOG_FLOOR:g} left out)" if self.dropped else "")
                     + f"; in-sample R^2 of ln(delta NLL) {self.r2_log:.3f}, residual std {self.residual_std:.3f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
        return {"mpqc_predictor": 1, **json_safe(d)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Predictor":
        if data.get("mpqc_predictor") != 1:
            raise ValueError(f"not an mpqc predictor of schema version 1 (mpqc_predictor = {data.get('mpqc_predictor')!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = {"terms", "intercept", "coef"} - set(data)
        if missing:
            raise ValueError(f"predictor lacks {sorted(missing)}")
        kw = {k: v for k, v in data.items() if k in fields}
        for k in ("terms", "coef", "coef_err", "unused", "models"):
            if k in kw:
                kw[k] = tuple(math.nan if v is None else v for v in kw[k])
        for k in ("intercept_err", "r2_log", "residual_std"):
            if kw.get(k) is None and k in kw:
                kw[k] = math.nan
        if len(kw["terms"]) != len(kw["coef"]):
            raise ValueError(f"predictor has {len(kw['terms'])} terms but {len(kw['coef'])} coefficients")
        for t in kw["terms"]:
            parse_term(t)
        return cls(**kw)

    def save(self, path: str) -> None:
        from mpqc.io import write_json_atomic

        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "Predictor":
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"predictor file {path} is not JSON: {e}") from e
        return cls.from_dict(data)


# ---- validation ---------------------------------------------------------------------------------


def metrics(true_delta, pred_delta, *, ratios=None, models=None) -> dict:
    """How well predicted delta_ppl matches measured delta_ppl.

    ``r2_log``: R^2 of ln(delta NLL) (the fit's space; rows with delta NLL > 0); ``mae``: mean
    |error| of delta_ppl; ``median_rel``: median |error| / measured; ``spearman``: rank
    correlation of delta_ppl; ``pairs_same_ratio``: the share of plan pairs of one model within
    SIMILAR_RATIO of each other in Q_r that the prediction orders as measured (0.5 is chance),
    and ``n_pairs``: how many such pairs."""
    t, p = np.asarray(true_delta, float), np.asarray(pred_delta, float)
    out = {"n": int(t.size)}
    dt, dp = np.log1p(t), np.log1p(p)
    ok = dt > 0
    if ok.sum() >= 2:
        lt, lp = np.log(dt[ok]), np.log(np.maximum(dp[ok], LOG_FLOOR))
        ss = float(((lt - lt.mean()) ** 2).sum())
        out["r2_log"] = 1.0 - float(((lt - lp) ** 2).sum()) / ss if ss > 0 else math.nan
    else:
        out["r2_log"] = math.nan
    out["mae"] = float(np.mean(np.abs(t - p))) if t.size else math.nan
    nz = np.abs(t) > 0
    out["median_rel"] = float(np.median(np.abs(t - p)[nz] / np.abs(t[nz]))) if nz.any() else math.nan
    out["spearman"] = float(stats.spearmanr(t, p).statistic) if t.size >= 3 and np.ptp(t) > 0 and np.ptp(p) > 0 else math.nan
    if ratios is not None:
        r = np.asarray(ratios, float)
        g = np.asarray(models if models is not None else [""] * t.size)
        good = total = 0
        for i in range(t.size):
            for j in range(i + 1, t.size):
                if g[i] != g[j] or abs(r[i] - r[j]) > SIMILAR_RATIO or t[i] == t[j]:
                    continue
                total += 1
                good += (p[i] - p[j]) * (t[i] - t[j]) > 0
        out["pairs_same_ratio"] = good / total if total else math.nan
        out["n_pairs"] = total
    return out


def validate(rows: Sequence[Mapping], terms: Sequence[str] = DEFAULT_TERMS, *, by: str = "plans", k: int = 5,
             seed: int = 0) -> dict:
    """Out-of-sample quality: ``by="plans"`` (k-fold over plans; every model seen in training)
    or ``by="models"`` (leave one model out: the held-out model's plans are predicted from the
    other models). Returns metrics pooled over all held-out predictions ("overall"), per model
    ("per_model"), and the predictions themselves."""
    rows = list(rows)
    n = len(rows)
    model_of = np.array([str(r["model"]) for r in rows])
    if by == "plans":
        if not 2 <= k <= n:
            raise ValueError(f"k-fold over plans needs 2 <= k <= {n} (the rows), got k={k}")
        order = np.random.default_rng(seed).permutation(n)
        folds = [order[i::k] for i in range(k)]
    elif by == "models":
        names = sorted(set(model_of))
        if len(names) < 2:
            raise ValueError(f"leave-one-model-out needs plans of at least two models, got {names}")
        folds = [np.flatnonzero(model_of == m) for m in names]
    else:
        raise ValueError(f"validate(by=...) takes 'plans' or 'models', got {by!r}")
    pred = np.full(n, math.nan)
    for test in folds:
        train_idx = np.setdiff1d(np.arange(n), test)
        model = Predictor.fit([rows[i] for i in train_idx], terms)
        pred[test] = model.predict([rows[i] for i in test])
    true = np.array([float(r["delta_ppl"]) for r in rows])
    ratio = np.array([float(r["ratio"]) for r in rows])
    per_model = {}
    for m in sorted(set(model_of)):
        idx = model_of == m
        per_model[m] = metrics(true[idx], pred[idx], ratios=ratio[idx])
    return {"by": by, "terms": list(terms), "k": k if by == "plans" else len(folds),
            "overall": metrics(true, pred, ratios=ratio, models=model_of), "per_model": per_model,
            "predictions": pred.tolist()}
