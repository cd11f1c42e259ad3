"""Out-of-sample quality of the predictor: k-fold over plans, or leave one model out."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from mpqc.studies.predict.model import DEFAULT_TERMS, LOG_FLOOR, Predictor

__all__ = ["SIMILAR_RATIO", "metrics", "validate"]

SIMILAR_RATIO = 0.05  # plans this close in Q_r count as "the same budget" when scoring the ranking


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
    out["spearman"] = (
        float(stats.spearmanr(t, p).statistic) if t.size >= 3 and np.ptp(t) > 0 and np.ptp(p) > 0 else math.nan
    )
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


def validate(
    rows: Sequence[Mapping], terms: Sequence[str] = DEFAULT_TERMS, *, by: str = "plans", k: int = 5, seed: int = 0
) -> dict:
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
    return {
        "by": by,
        "terms": list(terms),
        "k": k if by == "plans" else len(folds),
        "overall": metrics(true, pred, ratios=ratio, models=model_of),
        "per_model": per_model,
        "predictions": pred.tolist(),
    }
