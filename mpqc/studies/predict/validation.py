"""Out-of-sample quality of the predictor: k-fold over plans, leave one model out, or leave one
size out; and the predictor put to use: each held-out size's delta_ppl-vs-Q_r curve and its
Q_r,max per loss budget, predicted from the other sizes against the measured ones."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from mpqc.studies import laws
from mpqc.studies.predict.model import DEFAULT_TERMS, LOG_FLOOR, Predictor
from mpqc.studies.report.analysis import BUDGETS

__all__ = ["SIMILAR_RATIO", "leave_one_size_out", "metrics", "ratio_curves", "validate"]

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
    """Out-of-sample quality: ``by="plans"`` (k-fold over plans; every model seen in training),
    ``by="models"`` (leave one model out: the held-out model's plans are predicted from the
    other models) or ``by="sizes"`` (leave one size out: every model of that parameter count,
    e.g. its training seeds, held out together). Returns metrics pooled over all held-out predictions ("overall"), per model
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
    elif by == "sizes":
        size_of = np.array([float(r["params"]) for r in rows])
        sizes = np.unique(size_of)
        if sizes.size < 2:
            raise ValueError(
                f"leave-one-size-out needs plans of at least two model sizes (params), got {sizes.tolist()}"
            )
        folds = [np.flatnonzero(size_of == s) for s in sizes]
    else:
        raise ValueError(f"validate(by=...) takes 'plans', 'models' or 'sizes', got {by!r}")
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


def _max_ratio(ratios, deltas, budget) -> dict:
    m = laws.max_ratio_at_budget(ratios, deltas, budget)
    return {"value": None if math.isnan(m.value) else m.value, "status": m.status}


def ratio_curves(rows: Sequence[Mapping], predicted, budgets: Sequence[float] = BUDGETS) -> list[dict]:
    """Per model: its measured and its predicted delta_ppl-vs-Q_r curve over its plans, each made
    monotone (``laws.monotone_envelope``: the best plan known at Q_r or above), the curves' mean
    absolute difference in delta_ppl (``curve_mae``, at every plan's Q_r), and Q_r,max at each
    budget read off both (``laws.max_ratio_at_budget``), with ``error`` = predicted - measured
    where both are read, not bounds (``laws.READ_STATUSES``). ``predicted``: delta_ppl per row (e.g. held-out predictions)."""
    pred = np.asarray(predicted, float)
    out = []
    for m in sorted({str(r["model"]) for r in rows}):
        idx = [i for i, r in enumerate(rows) if str(r["model"]) == m]
        ratio = [float(rows[i]["ratio"]) for i in idx]
        true = [float(rows[i]["delta_ppl"]) for i in idx]
        _, env_true = laws.monotone_envelope(ratio, true)
        _, env_pred = laws.monotone_envelope(ratio, pred[idx])
        budget_rows = []
        for b in budgets:
            measured, predicted_max = _max_ratio(ratio, true, b), _max_ratio(ratio, pred[idx], b)
            both = measured["status"] in laws.READ_STATUSES and predicted_max["status"] in laws.READ_STATUSES
            budget_rows.append(
                {
                    "budget": b,
                    "measured": measured,
                    "predicted": predicted_max,
                    "error": predicted_max["value"] - measured["value"] if both else None,
                }
            )
        out.append(
            {
                "model": m,
                "params": rows[idx[0]]["params"],
                "n_plans": len(idx),
                "curve_mae": float(np.mean(np.abs(env_pred - env_true))),
                "budgets": budget_rows,
            }
        )
    return sorted(out, key=lambda c: (float(c["params"]), c["model"]))


def leave_one_size_out(
    rows: Sequence[Mapping], terms: Sequence[str] = DEFAULT_TERMS, *, budgets: Sequence[float] = BUDGETS
) -> dict:
    """The predictor put to use: for each model size, fit on the other sizes and predict the
    held-out size's plans; ``validate(by="sizes")``'s metrics plus ``curves``, each held-out
    model's measured against predicted Q_r curve and Q_r,max per budget (``ratio_curves``)."""
    rows = list(rows)
    result = validate(rows, terms, by="sizes")
    return {**result, "budgets": list(budgets), "curves": ratio_curves(rows, result["predictions"], budgets)}
