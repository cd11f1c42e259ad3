"""A sweep's results to numbers: Q_r,max per budget, Law 1 and Law 2 fits, the bits view.

``analyze(rows)`` is everything ``mpqc fit`` writes as JSON (laws.json); the figures and the
Markdown report (``figures.py``, ``markdown.py``) only draw and print what it returns.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np

from mpqc.studies import laws

__all__ = [
    "BUDGETS",
    "PAPER",
    "SETTING_KEYS",
    "analyze",
    "bits_view",
    "granularity_comparison",
    "granularity_pairs",
    "law1_fits",
    "law1_slope_test",
    "law2_by_size",
    "law2_fits",
    "law2_position",
    "max_ratios",
    "seed_max_ratios",
    "setting_label",
    "slope_verdict",
    "window_draws",
]

BUDGETS = (0.05, 0.10, 0.20)
# Cao et al. 2024, as the project's design notes quote them (Qwen-1.5, matmul-wise).
PAPER = {"law1_k": {"0.05": -11.7, "0.1": -11.3, "0.2": -12.8}, "law2_k_range": [0.3, 0.6]}
# The k the slope test is read against (issue 16), as the slope per decade it implies (+0.197).
PAPER["law1_slope_k"] = -11.68
PAPER["law1_slope_per_decade"] = laws.implied_slope(PAPER["law1_slope_k"])
SLOPE_ALPHA = 0.05  # the one-sided level of the slope test's verdict
# A setting is what one ratio curve holds fixed; rows of two Q_r definitions are two curves.
SETTING_KEYS = ("granularity", "low", "weights_only", "block_size", "q_r_definition")


def _setting(row) -> tuple:
    return tuple(row[k] for k in SETTING_KEYS)


def setting_label(setting) -> str:
    g, low, wo, bs, q_r = setting
    return f"{g}-wise, {low} {'weights only' if wo else 'W+A'}, block {bs}; Q_r: {q_r}"


def _models(rows) -> list[tuple[str, int]]:
    """(name, params), smallest first."""
    return sorted({(r["model"], r["params"]) for r in rows}, key=lambda m: (m[1], m[0]))


def max_ratios(rows, budgets=BUDGETS) -> list[dict]:
    """Q_r,max per (setting, model, budget), pooled over seeds, and per seed when there are several."""
    groups = defaultdict(list)
    for r in rows:
        groups[(_setting(r), r["model"], r["params"])].append(r)
    out = []
    for (setting, model, params), rs in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][2])):
        seeds = sorted({r["seed"] for r in rs})
        for b in budgets:
            pooled = laws.max_ratio_at_budget([r["achieved"] for r in rs], [r["delta_ppl"] for r in rs], b)
            per_seed = []
            if len(seeds) > 1:  # the search noise: the same curve read per seed
                for s in seeds:
                    m = laws.max_ratio_at_budget(
                        [r["achieved"] for r in rs if r["seed"] == s], [r["delta_ppl"] for r in rs if r["seed"] == s], b
                    )
                    per_seed.append(None if math.isnan(m.value) else m.value)
            out.append(
                {
                    "setting": setting_label(setting),
                    **dict(zip(SETTING_KEYS, setting)),
                    "model": model,
                    "params": params,
                    "budget": b,
                    "max_ratio": None if math.isnan(pooled.value) else pooled.value,
                    "status": pooled.status,
                    "per_seed": per_seed,
                    "n_ratios": len({r["ratio"] for r in rs}),
                }
            )
    return out


def law1_fits(max_ratio_rows, budgets=BUDGETS) -> list[dict]:
    """One Law 1 fit per (setting, budget) where at least three models have a read Q_r,max
    (``laws.READ_STATUSES``: interpolated, or 1 where the all-low plan meets the budget);
    settings without a ratio curve (one Q_r per model) are not listed."""
    fits = []
    # A setting searched at one Q_r per model (e.g. one point of a block-size sweep) has no ratio curve.
    settings = sorted({m["setting"] for m in max_ratio_rows if m["n_ratios"] > 1})
    for setting in settings:
        for b in budgets:
            ms = [m for m in max_ratio_rows if m["setting"] == setting and m["budget"] == b]
            used = [m for m in ms if m["status"] in laws.READ_STATUSES]
            left = {m["model"]: m["status"] for m in ms if m["status"] not in laws.READ_STATUSES}
            entry = {
                "setting": setting,
                "budget": b,
                "fit": None,
                "points": [{"model": m["model"], "params": m["params"], "max_ratio": m["max_ratio"]} for m in used],
                "left_out": left,
                "note": "",
            }
            if len({m["params"] for m in used}) < laws.MIN_POINTS:
                entry["note"] = (
                    f"not fitted: {len(used)} model(s) with a read Q_r,max (not a bound), "
                    f"{laws.MIN_POINTS} distinct sizes needed"
                )
            elif len({m["max_ratio"] for m in used}) < 2:  # e.g. every size meets it all low: no k
                entry["note"] = f"not fitted: every read Q_r,max is {used[0]['max_ratio']:.3g}, no slope to fit"
            else:
                fit = laws.fit_exponential([1 - m["max_ratio"] for m in used], [m["params"] for m in used])
                entry["fit"] = fit.to_dict()
            fits.append(entry)
    return fits


# ---- Law 1 as a slope test -----------------------------------------------------------------------


def _train_seed(row) -> int | None:
    """The row's training seed; None where the results carry none (an empty cell reads as NaN)."""
    value = row.get("train_seed")
    return value if isinstance(value, int) else None


def _seed_curves(rows) -> list[tuple[tuple, list[dict]]]:
    """The rows of each (params, model, training seed, search seed) curve, smallest model first
    (a missing training seed before any)."""
    curves = defaultdict(list)
    for r in rows:
        curves[(r["params"], r["model"], _train_seed(r), r["seed"])].append(r)

    def order(key):
        params, model, train_seed, seed = key
        return (params, model, -1 if train_seed is None else train_seed, seed)

    return sorted(curves.items(), key=lambda kv: order(kv[0]))


def seed_max_ratios(rows, budget: float) -> list[dict]:
    """Q_r,max at ``budget`` of each (model, training seed, search seed) curve in ``rows`` (one
    setting's rows): the points of the slope test, each seed's own search noise in it."""
    points = []
    for (params, model, train_seed, seed), rs in _seed_curves(rows):
        m = laws.max_ratio_at_budget([r["achieved"] for r in rs], [r["delta_ppl"] for r in rs], budget)
        points.append(
            {
                "model": model,
                "params": params,
                "train_seed": train_seed,
                "seed": seed,
                "max_ratio": None if math.isnan(m.value) else m.value,
                "status": m.status,
            }
        )
    return points


N_BOOT = 2000  # resamples of the slope test
WINDOW_SEED = 1  # the evaluation windows' resamples, drawn apart from the clusters' (seed 0)


def _recorded_windows(rows) -> int | None:
    """How many held-out windows every row records NLLs for; None when any row records none
    (results written before window_nll_*) or they differ in number."""
    counts = {len(r.get(c) or ()) for r in rows for c in ("window_nll_base", "window_nll_q")}
    return counts.pop() if len(counts) == 1 and 0 not in counts else None


def window_draws(rows, points, budget: float, n_boot: int = N_BOOT, seed: int = WINDOW_SEED) -> np.ndarray | None:
    """Each slope-test point's Q_r,max on ``n_boot`` resamples of the evaluation windows (NaN
    where not read on those windows), for :func:`laws.slope_test`'s ``q_max_draws``; None
    without per-window NLLs. Resample b draws the same window indices for every row: a model's
    cells share their windows, and so do the sizes of a family sharing one tokenizer."""
    n_windows = _recorded_windows(rows)
    if n_windows is None:
        return None
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, n_windows))
    np.add.at(counts, (np.arange(n_boot)[:, None], rng.integers(0, n_windows, (n_boot, n_windows))), 1.0)
    weights = counts / n_windows  # resample b's mean NLL of a row: weights[b] @ its window NLLs
    curves = dict(_seed_curves(rows))
    draws = np.empty((n_boot, len(points)))
    for k, p in enumerate(points):
        rs = curves[(p["params"], p["model"], p["train_seed"], p["seed"])]
        nll_q = np.array([r["window_nll_q"] for r in rs]).T  # windows x rows
        nll_base = np.array([r["window_nll_base"] for r in rs]).T
        with np.errstate(over="ignore"):
            delta = np.expm1(weights @ nll_q - weights @ nll_base)
        values, status = laws.max_ratios_at_budget([r["achieved"] for r in rs], delta, budget)
        read = np.isin(status, [laws.STATUSES.index(s) for s in laws.READ_STATUSES])
        draws[:, k] = np.where(read, values, np.nan)  # as the point estimates: interpolated or all_low
    return draws


def _clusters(points) -> tuple[list[str] | None, str]:
    """(one cluster label per point, what the bootstrap resamples): points that share a training
    and a search seed share their noise and are resampled together; with one seed, points."""
    by_train = any(p["train_seed"] is not None for p in points)
    labels = [f"train {p['train_seed']} x search {p['seed']}" if by_train else f"search {p['seed']}" for p in points]
    if len(set(labels)) < 2:
        return None, "points (one seed: nothing to cluster by)"
    return labels, "training seed x search seed" if by_train else "search seed"


def slope_verdict(test: laws.SlopeTest, paper: float = PAPER["law1_slope_per_decade"]) -> str:
    """One sentence: is the slope positive at ``SLOPE_ALPHA``, and where its interval lies
    against the paper's implied slope."""
    interval = f"interval [{test.ci_low:+.3f}, {test.ci_high:+.3f}] per decade vs the paper's {paper:.3f}"
    where = "inside" if test.ci_low <= paper <= test.ci_high else "above" if paper > test.ci_high else "below"
    tail = f" (one-sided p = {test.p_value:.3g}; the paper's slope lies {where} the interval)"
    if test.p_value < SLOPE_ALPHA:
        return f"positive slope at {100 * SLOPE_ALPHA:g}%; {interval}{tail}"
    return f"no evidence of a positive slope; {interval}{tail}"


def law1_slope_test(rows, budget: float) -> dict:
    """Law 1 as a test on one setting's rows: the slope of Q_r,max on log10(size) over every
    (model, training seed, search seed) with a read Q_r,max (as the fit uses), a
    cluster bootstrap over the seeds, and the verdict."""
    points = seed_max_ratios(rows, budget)
    used = [p for p in points if p["status"] in laws.READ_STATUSES]
    labels, resampled = _clusters(used)
    entry = {
        "test": None,
        "verdict": "",
        "resampled": resampled,
        "paper_slope": PAPER["law1_slope_per_decade"],
        "points": used,
        "left_out": dict(Counter(p["status"] for p in points if p["status"] not in laws.READ_STATUSES)),
    }
    if len({p["params"] for p in used}) < laws.MIN_POINTS:
        entry["verdict"] = (
            f"not tested: {len({p['params'] for p in used})} size(s) with a read Q_r,max (not a bound), "
            f"{laws.MIN_POINTS} needed"
        )
        return entry
    draws = window_draws(rows, used, budget)
    if draws is not None:
        entry["resampled"] += " x evaluation windows"
    try:
        test = laws.slope_test(
            [p["params"] for p in used],
            [p["max_ratio"] for p in used],
            clusters=labels,
            n_boot=N_BOOT,
            q_max_draws=draws,
        )
    except ValueError as e:  # e.g. every resample of the clusters held one size: said, not faked
        entry["verdict"] = f"not tested: {e}"
        return entry
    entry["test"] = test.to_dict()
    entry["verdict"] = slope_verdict(test)
    return entry


# Law 2 as the paper fits it (Cao et al. 2024): at asked ratios up to 0.95, without points
# above 100% delta_ppl, per-vector and per-tensor blocks at their average elements per scale.
LAW2_MAX_RATIO = 0.95
LAW2_MAX_DELTA = 1.0


def law2_position(row) -> float | None:
    """Where a row sits on Law 2's block-size axis: its plan's average elements per scale
    (``block_elements``), which is the block size wherever the rows are whole blocks, and what a
    block longer than a model's rows really shares (a 512 block on rows of 64 is per-vector);
    without it (results written before it) the block size, and None for "vector"/"tensor"."""
    elements = row.get("block_elements")
    if isinstance(elements, (int, float)) and math.isfinite(elements):
        return float(elements)
    return float(row["block_size"]) if isinstance(row["block_size"], int) else None


def _law2_point(row) -> dict:
    """One row as a Law 2 point, with why it is left out of the fit (``left_out``, or None)."""
    x, delta = law2_position(row), row["delta_ppl"]
    if x is None:
        why = "no element count for its per-vector/per-tensor block (results written before block_elements)"
    elif not math.isfinite(delta) or delta > LAW2_MAX_DELTA:
        why = f"delta_ppl above {100 * LAW2_MAX_DELTA:g}%"
    elif delta <= 0:
        why = "delta_ppl <= 0 (no logarithm)"
    else:
        why = None
    return {"block_size": row["block_size"], "x": x, "delta_ppl": delta, "seed": row["seed"], "left_out": why}


def law2_fits(rows) -> list[dict]:
    """One Law 2 fit per (model, granularity, format, asked Q_r, Q_r definition) over its block
    sizes, by the paper's rules (``LAW2_MAX_RATIO``, ``LAW2_MAX_DELTA``, ``law2_position``).
    Groups of one block size are no block-size sweep and are not listed; groups above the
    ratio limit are listed, not fitted."""
    groups = defaultdict(list)
    for r in rows:
        groups[
            (r["model"], r["params"], r["granularity"], r["low"], r["weights_only"], r["ratio"], r["q_r_definition"])
        ].append(r)
    fits = []
    for (model, params, g, low, wo, ratio, q_r), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], str(kv[0]))):
        if len({r["block_size"] for r in rs}) < 2:
            continue
        points = [_law2_point(r) for r in rs]
        used = [p for p in points if p["left_out"] is None]
        entry = {
            "model": model,
            "params": params,
            "granularity": g,
            "low": low,
            "weights_only": wo,
            "ratio": ratio,
            "q_r_definition": q_r,
            "points": points,
            "fit": None,
            "note": _law2_note(points, ratio),
        }
        if ratio <= LAW2_MAX_RATIO and len({p["x"] for p in used}) >= laws.MIN_POINTS:
            entry["fit"] = laws.fit_power(*_at_distinct_x(used)).to_dict()
        elif ratio <= LAW2_MAX_RATIO:
            entry["note"] += f"not fitted: fewer than {laws.MIN_POINTS} block sizes left to fit"
        fits.append(entry)
    return fits


def _at_distinct_x(points) -> tuple[list[float], list[float]]:
    """One Law 2 point per element count: blocks that share as many elements a scale (in a small
    model, every block as long as its rows or longer) are one point on the axis, at the geometric
    mean of their delta_ppl (the fit is a line in logs), not several that outweigh the rest."""
    at = defaultdict(list)
    for p in points:
        at[p["x"]].append(math.log(p["delta_ppl"]))
    xs = sorted(at)
    return xs, [math.exp(sum(at[x]) / len(at[x])) for x in xs]


_LAW2_CURVE = ("granularity", "low", "weights_only", "ratio", "q_r_definition")  # what one Law 2 line holds fixed


def law2_by_size(fits) -> list[dict]:
    """Law 2's k per (size, granularity, format, asked Q_r) over the models of that size that were
    fitted (e.g. its training seeds): each one's k, their mean and range, and one fit through all
    their kept points together (``pooled``: k with one standard error)."""
    groups = defaultdict(list)
    for f in fits:
        if f["fit"] is not None:
            groups[(f["params"], *(f[k] for k in _LAW2_CURVE))].append(f)
    out = []
    for (params, *curve), fs in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1:]))):
        ks = [f["fit"]["k"] for f in fs]
        xs, ys = [], []
        for f in fs:  # each model's distinct element counts, pooled
            x, y = _at_distinct_x([p for p in f["points"] if p["left_out"] is None])
            xs, ys = xs + x, ys + y
        pooled = laws.fit_power(xs, ys) if len(fs) > 1 else None
        out.append(
            {
                "params": params,
                **dict(zip(_LAW2_CURVE, curve)),
                "models": [f["model"] for f in fs],
                "k": ks,
                "k_mean": float(np.mean(ks)),
                "k_min": min(ks),
                "k_max": max(ks),
                "x_range": [min(xs), max(xs)],  # elements per scale the fits span
                "pooled": None if pooled is None else pooled.to_dict(),
            }
        )
    return out


def _law2_note(points, ratio) -> str:
    if ratio > LAW2_MAX_RATIO:
        return (
            f"not fitted: Q_r {ratio:g} is above {LAW2_MAX_RATIO:g} (the paper fits Law 2 at Q_r <= {LAW2_MAX_RATIO:g})"
        )
    reasons = defaultdict(int)
    for p in points:
        if p["left_out"] is not None:
            reasons[p["left_out"]] += 1
    return "".join(f"{n} point(s) left out: {why}; " for why, n in reasons.items())


# Layer-wise against matmul-wise (Cao et al.'s comparison): the same curve but for granularity.
_PAIR_KEYS = ("model", "params", "low", "weights_only", "block_size", "q_r_definition", "seed")


def _pair_key(row) -> tuple:
    return (*(row[k] for k in _PAIR_KEYS), _train_seed(row))


def granularity_pairs(rows) -> list[dict]:
    """Each layer-wise plan beside the matmul-wise curve of the same model, training seed, search
    seed and format, read at the layer-wise plan's achieved Q_r (monotone envelope, linear
    between measured ratios): ``difference`` = layer-wise minus matmul-wise delta_ppl. A plan
    outside the matmul-wise curve's measured ratios is left out (no extrapolation)."""
    matmul = defaultdict(list)
    for r in rows:
        if r["granularity"] == "matmul":
            matmul[_pair_key(r)].append(r)
    curves = {  # each matmul-wise curve enveloped once, for all the layer-wise plans read off it
        key: laws.monotone_envelope([c["achieved"] for c in rs], [c["delta_ppl"] for c in rs])
        for key, rs in matmul.items()
    }
    pairs = []
    for r in rows:
        curve = curves.get(_pair_key(r)) if r["granularity"] == "layer" else None
        if curve is None:
            continue
        ratios, env = curve
        q = r["achieved"]
        if not ratios[0] <= q <= ratios[-1] or not np.all(np.isfinite(env)):
            continue
        read = float(np.interp(q, ratios, env))
        pairs.append(
            {
                **{k: r[k] for k in ("model", "params", "low", "weights_only", "block_size", "seed")},
                "train_seed": _train_seed(r),
                "achieved": q,
                "delta_layer": r["delta_ppl"],
                "delta_matmul": read,
                "difference": r["delta_ppl"] - read,
            }
        )
    return pairs


def granularity_comparison(rows) -> list[dict]:
    """:func:`granularity_pairs` summed up per (size, format): at Q_r < 1 the mean, median and
    range of the difference and how many layer-wise plans lost; at Q_r = 1 (every weight matmul
    low at both) the largest absolute difference: the attention matmuls, which have no weights,
    are low with their layer but may stay high in a matmul-wise plan."""
    groups = defaultdict(list)
    for p in granularity_pairs(rows):
        groups[(p["params"], p["low"], p["weights_only"], p["block_size"])].append(p)
    out = []
    for (params, low, wo, bs), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1:]))):
        mixed = np.array([p["difference"] for p in ps if p["achieved"] < laws.ALL_LOW_Q_R])
        full = [abs(p["difference"]) for p in ps if p["achieved"] >= laws.ALL_LOW_Q_R]
        out.append(
            {
                "params": params,
                "models": sorted({p["model"] for p in ps}),
                "low": low,
                "weights_only": wo,
                "block_size": bs,
                "achieved": sorted({round(p["achieved"], 4) for p in ps if p["achieved"] < laws.ALL_LOW_Q_R}),
                "n": int(mixed.size),
                "mean": float(mixed.mean()) if mixed.size else None,
                "median": float(np.median(mixed)) if mixed.size else None,
                "min": float(mixed.min()) if mixed.size else None,
                "max": float(mixed.max()) if mixed.size else None,
                "layer_worse": int(np.count_nonzero(mixed > 0)),
                "n_all_low": len(full),
                "all_low_max_abs": max(full) if full else None,
            }
        )
    return out


def bits_view(rows) -> dict:
    """Perplexity against total weight bits: every point, the all-high baselines, the Pareto front."""
    points = [
        {
            "model": r["model"],
            "params": r["params"],
            "setting": setting_label(_setting(r)),
            "ratio": r["ratio"],
            "total_bits": r["total_bits"],
            "average_bits": r["average_bits"],
            "ppl": r["ppl_q"],
        }
        for r in rows
    ]
    high_bits = {"bf16": 16, "fp16": 16, "fp32": 32}
    baselines = [
        {
            "model": r["model"],
            "params": r["params"],
            "setting": f"all {r['high']}",
            "total_bits": r["matmul_params"] * high_bits.get(r["high"], 16),
            "average_bits": high_bits.get(r["high"], 16),
            "ppl": r["ppl_base"],
        }
        for r in {r["model"]: r for r in rows}.values()
    ]
    front, best = [], math.inf
    for p in sorted(points + baselines, key=lambda p: (p["total_bits"], p["ppl"])):
        if p["ppl"] < best:  # lower perplexity than everything with fewer bits
            front.append(p)
            best = p["ppl"]
    return {"points": points, "baselines": baselines, "pareto": front}


def analyze(rows, budgets=BUDGETS) -> dict:
    """Everything ``mpqc fit`` writes as JSON."""
    mr = max_ratios(rows, budgets)
    law1 = law1_fits(mr, budgets)
    by_setting = defaultdict(list)
    for r in rows:
        by_setting[setting_label(_setting(r))].append(r)
    for e in law1:  # the test beside the paper's exponential form, on the same setting and budget
        e["slope_test"] = law1_slope_test(by_setting[e["setting"]], e["budget"])
    return {
        "n_rows": len(rows),
        "models": [
            {"model": m, "params": p, "ppl_base": next(r["ppl_base"] for r in rows if r["model"] == m)}
            for m, p in _models(rows)
        ],
        "settings": sorted({setting_label(_setting(r)) for r in rows}),
        "q_r_definitions": sorted({r["q_r_definition"] for r in rows}),
        "budgets": list(budgets),
        "max_ratio": mr,
        "law1": law1,
        "law2": (law2 := law2_fits(rows)),
        "law2_by_size": law2_by_size(law2),
        "granularity": granularity_comparison(rows),
        "bits": bits_view(rows),
        "paper": PAPER,
    }
