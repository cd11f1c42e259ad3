"""A sweep's results to numbers: Q_r,max per budget, Law 1 and Law 2 fits, the bits view.

``analyze(rows)`` is everything ``mpqc fit`` writes as JSON (laws.json); the figures and the
Markdown report (``figures.py``, ``markdown.py``) only draw and print what it returns.
"""

from __future__ import annotations

import math
from collections import defaultdict

from mpqc.studies import laws

__all__ = [
    "BUDGETS",
    "PAPER",
    "SETTING_KEYS",
    "analyze",
    "bits_view",
    "law1_fits",
    "law2_fits",
    "law2_position",
    "max_ratios",
    "setting_label",
]

BUDGETS = (0.05, 0.10, 0.20)
# Cao et al. 2024, as the project's design notes quote them (Qwen-1.5, matmul-wise).
PAPER = {"law1_k": {"0.05": -11.7, "0.1": -11.3, "0.2": -12.8}, "law2_k_range": [0.3, 0.6]}
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
    """One Law 1 fit per (setting, budget) where at least three models have an interpolated Q_r,max;
    settings without a ratio curve (one Q_r per model) are not listed."""
    fits = []
    # A setting searched at one Q_r per model (e.g. one point of a block-size sweep) has no ratio curve.
    settings = sorted({m["setting"] for m in max_ratio_rows if m["n_ratios"] > 1})
    for setting in settings:
        for b in budgets:
            ms = [m for m in max_ratio_rows if m["setting"] == setting and m["budget"] == b]
            used = [m for m in ms if m["status"] == "interpolated"]
            left = {m["model"]: m["status"] for m in ms if m["status"] != "interpolated"}
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
                    f"not fitted: {len(used)} model(s) with an interpolated Q_r,max, "
                    f"{laws.MIN_POINTS} distinct sizes needed"
                )
            else:
                fit = laws.fit_exponential([1 - m["max_ratio"] for m in used], [m["params"] for m in used])
                entry["fit"] = fit.to_dict()
            fits.append(entry)
    return fits


# Law 2 as the paper fits it (Cao et al. 2024): at asked ratios up to 0.95, without points
# above 100% delta_ppl, per-vector and per-tensor blocks at their average elements per scale.
LAW2_MAX_RATIO = 0.95
LAW2_MAX_DELTA = 1.0


def law2_position(row) -> float | None:
    """Where a row sits on Law 2's block-size axis: its block size, or for "vector"/"tensor" its
    plan's average elements per scale (``block_elements``; None in results written before it)."""
    if isinstance(row["block_size"], int):
        return float(row["block_size"])
    elements = row.get("block_elements")
    return float(elements) if isinstance(elements, (int, float)) and math.isfinite(elements) else None


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
            entry["fit"] = laws.fit_power([p["x"] for p in used], [p["delta_ppl"] for p in used]).to_dict()
        elif ratio <= LAW2_MAX_RATIO:
            entry["note"] += f"not fitted: fewer than {laws.MIN_POINTS} block sizes left to fit"
        fits.append(entry)
    return fits


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
        "law1": law1_fits(mr, budgets),
        "law2": law2_fits(rows),
        "bits": bits_view(rows),
        "paper": PAPER,
    }
