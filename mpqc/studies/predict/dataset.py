"""Prediction data: sampled (and searched) plans of one model, their features and measured
delta_ppl, as rows; the rows as CSV (``COLUMNS``) and back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from mpqc.compile import QuantizedModel
from mpqc.evaluate import EXP_LIMIT, nll, sample_windows
from mpqc.graph import Graph
from mpqc.io import read_csv, typed_rows, write_csv_atomic
from mpqc.search.budget import Budget, SearchSpace, decode, search_precisions
from mpqc.search.config import SearchConfig
from mpqc.search.sensitivity import priorities_from_sensitivity
from mpqc.studies.predict.features import FEATURES, Features

__all__ = ["COLUMNS", "collect", "read_data", "sample_plans", "write_data"]

COLUMNS = (
    "model",
    "setup",
    "plan_id",
    "source",
    "granularity",
    "low",
    "high",
    "weights_only",
    "block_size",
    "keep_high",
    "target_ratio",
    "n_low",
    *FEATURES,
    "ppl_base",
    "ppl_q",
    "delta_ppl",
    "dnll",
    "calib_samples",
    "probe_samples",
    "eval_samples",
    "seq_len",
    "seed",
    "feature_seconds",
    "eval_seconds",
    "low_components",
)
_STR = {"model", "setup", "source", "granularity", "low", "high", "block_size", "keep_high", "low_components"}
_INT = {"plan_id", "n_low", "params", "calib_samples", "probe_samples", "eval_samples", "seq_len", "seed"}


def _setup_key(setup: Mapping) -> str:
    return hashlib.sha256(json.dumps(dict(setup), sort_keys=True, default=str).encode()).hexdigest()[:12]


def sample_plans(
    space: SearchSpace,
    n_plans: int,
    *,
    seed: int = 0,
    ratio_range=(0.2, 1.0),
    guided_fraction: float = 0.3,
    sensitivity: Mapping[str, float] | None = None,
) -> list[dict]:
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
            plans.append(
                {
                    "plan_id": i,
                    "source": "guided" if guided else "random",
                    "target_ratio": target,
                    "low": sorted(low, key=names.index),
                }
            )
        i += 1
    return plans


@dataclasses.dataclass(frozen=True)
class CollectSetup:
    """How a collection chooses and measures plans. Every field but ``n_plans`` and
    ``batch_size`` identifies the rows it made (``key``), so a resumed collection skips them."""

    n_plans: int = 40
    low: str = "mxint4"
    high: str = "bf16"
    weights_only: bool = False
    granularity: str = "matmul"
    block_size: object = None
    seq_len: int = 128
    calib_samples: int = 4
    probe_samples: int = 2
    eval_samples: int = 8
    batch_size: int = 8
    seed: int = 0
    ratio_range: tuple = (0.2, 1.0)
    guided_fraction: float = 0.3
    search_trials: int = 0
    search_ratios: tuple = (0.5, 0.9)
    prefix: tuple = ()
    keep_high: tuple = ()  # components or roles kept high: not in the plans, outside Q_r

    def key(self) -> str:
        setup = dataclasses.asdict(self)
        del setup["n_plans"], setup["batch_size"]
        setup.update(ratio_range=list(self.ratio_range), search_ratios=list(self.search_ratios))
        setup["prefix"] = [int(t) for t in self.prefix]
        if not setup["prefix"]:  # only with one: data collected before windows had prefixes keep their keys
            del setup["prefix"]
        setup["keep_high"] = list(self.keep_high)
        if not setup["keep_high"]:  # likewise: data collected before keep_high keep their keys
            del setup["keep_high"]
        return _setup_key(setup)

    def search(self) -> SearchConfig:
        """The short sensitivity-seeded searches whose trials join the sampled plans (budget set per ratio)."""
        return SearchConfig(
            budget=("params", 1.0),
            granularity=self.granularity,
            low=self.low,
            high=self.high,
            weights_only=self.weights_only,
            sampler="sensitivity",
            n_trials=self.search_trials,
            seq_len=self.seq_len,
            n_samples=self.calib_samples,
            batch_size=self.batch_size,
            seed=self.seed,
            block_size=self.block_size,
            prefix=tuple(self.prefix),
            keep_high=tuple(self.keep_high),
            # The trials are data: every one scored on all windows, as the data has always been.
            pruner=None,
            rescore=0,
            baselines=False,
            search_dominated=True,
        )


def collect(
    graph: Graph,
    search_tokens: torch.Tensor,
    holdout_tokens: torch.Tensor,
    *,
    model: str,
    qmodel: QuantizedModel | None = None,
    existing: Sequence[Mapping] = (),
    on_row=None,
    progress: bool = True,
    **settings,
) -> list[dict]:
    """Rows of (features, measured delta_ppl) for sampled plans of one model.

    ``settings``: the fields of ``CollectSetup``. Features come from ``calib_samples`` windows
    of ``search_tokens`` (the first ``probe_samples`` of them probe the noise); delta_ppl is
    measured on ``eval_samples`` windows of ``holdout_tokens`` against the all-``high`` plan.
    Plans: ``sample_plans`` and, with ``search_trials``, every distinct trial of a short
    sensitivity-seeded search at each of ``search_ratios``. Rows of ``existing`` with the same
    model and setup are not measured again (resume); ``on_row(rows)`` is called with all rows
    so far after each new one. ``prefix``: the token ids every window opens with
    (``mpqc.data.text_prefix``: a BOS).
    """
    import mpqc

    c = CollectSetup(**settings)
    key = c.key()
    low_p, high_p = search_precisions(c.low, c.high, weights_only=c.weights_only)
    space = SearchSpace(
        graph, c.granularity, low_p, high_p, Budget("params", 0.0), c.block_size, keep_high=tuple(c.keep_high)
    )
    rows = [dict(r) for r in existing]
    done = {int(r["plan_id"]) for r in rows if r["model"] == model and r["setup"] == key}
    qmodel = qmodel or mpqc.compile(graph, space.plan([]))
    prefix = [int(t) for t in c.prefix]
    calib = sample_windows(search_tokens, c.seq_len, c.calib_samples, c.seed + 1, prefix)
    evals = sample_windows(holdout_tokens, c.seq_len, c.eval_samples, c.seed + 2, prefix)
    t0 = time.perf_counter()
    feats = Features(
        qmodel,
        space,
        calib,
        probe_samples=c.probe_samples,
        batch_size=c.batch_size,
        noise_seed=c.seed,
        progress=progress,
    )
    model_seconds = time.perf_counter() - t0
    qmodel.set_plan(space.plan([]))
    nll_base = nll(qmodel, windows=evals, batch_size=c.batch_size, progress=False)
    plans = sample_plans(
        space,
        c.n_plans,
        seed=c.seed,
        ratio_range=c.ratio_range,
        guided_fraction=c.guided_fraction,
        sensitivity=feats.sensitivity,
    )
    if c.search_trials:
        plans += _search_plans(graph, search_tokens, space, qmodel, plans, c.search(), ratios=c.search_ratios)
    shared = {
        **{k: getattr(c, k) for k in _ROW_SETTINGS},
        "model": model,
        "setup": key,
        "ppl_base": math.exp(nll_base),
        "block_size": "default" if c.block_size is None else str(c.block_size),
        "keep_high": ",".join(c.keep_high),
    }
    feature_share = model_seconds / max(len(plans), 1)  # the per-model measurements, spread over the plans
    for p in tqdm(
        [p for p in plans if p["plan_id"] not in done], desc=f"collect {model}", unit="plan", disable=not progress
    ):
        rows.append(_measure_plan(p, feats, qmodel, space, evals, nll_base, c.batch_size, shared, feature_share))
        if on_row is not None:
            on_row(rows)
    qmodel.set_plan(space.plan([]))
    return rows


# The settings each row repeats.
_ROW_SETTINGS = (
    "granularity",
    "low",
    "high",
    "weights_only",
    "calib_samples",
    "probe_samples",
    "eval_samples",
    "seq_len",
    "seed",
)


def _measure_plan(p, feats, qmodel, space, evals, nll_base, batch_size, shared, feature_share) -> dict:
    """One row: the plan's features and its measured delta_ppl on the held-out windows."""
    t1 = time.perf_counter()
    f = feats.features(p["low"])
    t2 = time.perf_counter()
    qmodel.set_plan(space.plan(p["low"]))
    nll_q = nll(qmodel, windows=evals, batch_size=batch_size, progress=False)
    t3 = time.perf_counter()
    dnll = nll_q - nll_base
    return {
        **shared,
        "plan_id": p["plan_id"],
        "source": p["source"],
        "target_ratio": p["target_ratio"],
        "n_low": len(p["low"]),
        **f,
        "ppl_q": math.exp(min(nll_q, EXP_LIMIT)),
        "delta_ppl": math.expm1(min(dnll, EXP_LIMIT)),
        "dnll": dnll,
        "feature_seconds": round(t2 - t1 + feature_share, 4),
        "eval_seconds": round(t3 - t2, 4),
        "low_components": ";".join(p["low"]),
    }


def _search_plans(graph, tokens, space, qmodel, existing, search: SearchConfig, *, ratios) -> list[dict]:
    """The distinct completed plans of one search per ratio in ``ratios`` (``search`` at that ratio)."""
    import mpqc

    seen = {frozenset(p["low"]) for p in existing}
    names = [c.name for c in space.components]
    out = []
    for k, r in enumerate(ratios):
        result = mpqc.search.run(graph, tokens, search.replace(budget=("params", r)), qmodel=qmodel, progress=False)
        for t in result.study.trials:
            chosen = t.user_attrs.get("low")
            if t.state.name != "COMPLETE" or chosen is None or frozenset(chosen) in seen:
                continue
            seen.add(frozenset(chosen))
            # ids past any sampled plan's, stable for the same settings
            out.append(
                {
                    "plan_id": 1_000_000 + 1000 * k + t.number,
                    "source": "search",
                    "target_ratio": r,
                    "low": sorted(chosen, key=names.index),
                }
            )
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
        raise ValueError(
            f"{path} lacks columns {missing}; expected the columns of `mpqc predict collect` ({', '.join(COLUMNS)})"
        )
    kinds = {**{k: "str" for k in _STR}, **{k: "int" for k in _INT}, "weights_only": "bool"}
    rows = typed_rows(raw, kinds, default="float", where=path)
    if not rows:
        raise ValueError(f"{path} has no rows")
    for r in rows:  # data collected before keep_high kept nothing high
        r.setdefault("keep_high", "")
    return rows
