"""From a sweep's results CSV to fitted laws (JSON), figures (PNG) and a Markdown report.

    paths = mpqc.studies.report.write_report("runs/sweep_small.csv", "runs/sweep_small")   # also: mpqc fit

* Q_r,max per model and loss budget (5/10/20% delta_ppl by default), read off each model's
  ratio curve (achieved Q_r against held-out delta_ppl, made monotone), per setting
  (granularity, low format, weights-only, block size); with several seeds, also per seed.
* Law 1 per setting and budget: size = exp(k * (1 - Q_r,max) + c) over the models whose
  Q_r,max was interpolated (at least three), size = all model parameters.
* Law 2 per model, setting and asked Q_r: delta_ppl = A * block_size^k over numeric block sizes.
* The bits view (Dettmers & Zettlemoyer): held-out perplexity against total matmul weight bits,
  with the Pareto front (the bit-optimal configurations).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict

import numpy as np

from mpqc.studies import laws
from mpqc.io import atomic_file, json_safe, write_json_atomic, write_text_atomic
from mpqc.studies.sweep import read_results

__all__ = ["BUDGETS", "PAPER", "analyze", "figures", "markdown", "write_report"]

BUDGETS = (0.05, 0.10, 0.20)
# Cao et al. 2024, as the project's design notes quote them (Qwen-1.5, matmul-wise).
PAPER = {"law1_k": {"0.05": -11.7, "0.1": -11.3, "0.2": -12.8}, "law2_k_range": [0.3, 0.6]}
SETTING_KEYS = ("granularity", "low", "weights_only", "block_size")
FIGURES = ("ratio_vs_delta", "law1", "law2", "bits")


def _setting(row) -> tuple:
    return tuple(row[k] for k in SETTING_KEYS)


def setting_label(setting) -> str:
    g, low, wo, bs = setting
    return f"{g}-wise, {low} {'weights only' if wo else 'W+A'}, block {bs}"


def _models(rows) -> list[tuple[str, int]]:
    """(name, params), smallest first."""
    return sorted({(r["model"], r["params"]) for r in rows}, key=lambda m: (m[1], m[0]))


# ---- analysis -----------------------------------------------------------------------------------


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
                    m = laws.max_ratio_at_budget([r["achieved"] for r in rs if r["seed"] == s],
                                                 [r["delta_ppl"] for r in rs if r["seed"] == s], b)
                    per_seed.append(None if math.isnan(m.value) else m.value)
            out.append({"setting": setting_label(setting), **dict(zip(SETTING_KEYS, setting)), "model": model,
                        "params": params, "budget": b, "max_ratio": None if math.isnan(pooled.value) else pooled.value,
                        "status": pooled.status, "per_seed": per_seed,
                        "n_ratios": len({r["ratio"] for r in rs})})
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
            entry = {"setting": setting, "budget": b, "fit": None,
                     "points": [{"model": m["model"], "params": m["params"], "max_ratio": m["max_ratio"]} for m in used],
                     "left_out": left, "note": ""}
            if len({m["params"] for m in used}) < laws.MIN_POINTS:
                entry["note"] = (f"not fitted: {len(used)} model(s) with an interpolated Q_r,max, "
                                 f"{laws.MIN_POINTS} distinct sizes needed")
            else:
                fit = laws.fit_exponential([1 - m["max_ratio"] for m in used], [m["params"] for m in used])
                entry["fit"] = fit.to_dict()
            fits.append(entry)
    return fits


def law2_fits(rows) -> list[dict]:
    """One Law 2 fit per (model, granularity, format, asked Q_r) over numeric block sizes."""
    groups = defaultdict(list)
    for r in rows:
        if isinstance(r["block_size"], int):
            groups[(r["model"], r["params"], r["granularity"], r["low"], r["weights_only"], r["ratio"])].append(r)
    fits = []
    for (model, params, g, low, wo, ratio), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], str(kv[0]))):
        blocks = sorted({r["block_size"] for r in rs})
        if len(blocks) < 2:
            continue  # one block size is no block-size sweep
        usable = [r for r in rs if r["delta_ppl"] > 0]
        entry = {"model": model, "params": params, "granularity": g, "low": low, "weights_only": wo, "ratio": ratio,
                 "points": [{"block_size": r["block_size"], "delta_ppl": r["delta_ppl"], "seed": r["seed"]} for r in rs],
                 "fit": None, "note": ""}
        if len(rs) > len(usable):
            entry["note"] = f"{len(rs) - len(usable)} point(s) with delta_ppl <= 0 left out (no logarithm); "
        if len({r["block_size"] for r in usable}) < laws.MIN_POINTS:
            entry["note"] += f"not fitted: fewer than {laws.MIN_POINTS} block sizes with delta_ppl > 0"
        else:
            entry["fit"] = laws.fit_power([r["block_size"] for r in usable], [r["delta_ppl"] for r in usable]).to_dict()
        fits.append(entry)
    return fits


def bits_view(rows) -> dict:
    """Perplexity against total weight bits: every point, the all-high baselines, the Pareto front."""
    points = [{"model": r["model"], "params": r["params"], "setting": setting_label(_setting(r)), "ratio": r["ratio"],
               "total_bits": r["total_bits"], "average_bits": r["average_bits"], "ppl": r["ppl_q"]} for r in rows]
    high_bits = {"bf16": 16, "fp16": 16, "fp32": 32}
    baselines = [{"model": r["model"], "params": r["params"], "setting": f"all {r['high']}",
                  "total_bits": r["matmul_params"] * high_bits.get(r["high"], 16), "average_bits": high_bits.get(r["high"], 16),
                  "ppl": r["ppl_base"]} for r in {r["model"]: r for r in rows}.values()]
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
        "models": [{"model": m, "params": p, "ppl_base": next(r["ppl_base"] for r in rows if r["model"] == m)}
                   for m, p in _models(rows)],
        "settings": sorted({setting_label(_setting(r)) for r in rows}),
        "budgets": list(budgets),
        "max_ratio": mr,
        "law1": law1_fits(mr, budgets),
        "law2": law2_fits(rows),
        "bits": bits_view(rows),
        "paper": PAPER,
    }


# ---- figures ------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _size_colors(rows):
    plt = _plt()
    models = _models(rows)
    cmap = plt.get_cmap("viridis")
    return {m: cmap(i / max(1, len(models) - 1) * 0.9) for i, (m, _) in enumerate(models)}


def _empty(ax, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _grid(n: int, width=5.0, height=3.8):
    plt = _plt()
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def fig_ratio_vs_delta(rows, budgets, path):
    """Paper Fig. 2-3: held-out delta_ppl against achieved Q_r, one line per model size."""
    colors = _size_colors(rows)
    settings = sorted({_setting(r) for r in rows}, key=str)
    curves = [st for st in settings if len({(r["model"], r["ratio"]) for r in rows if _setting(r) == st})
              > len({r["model"] for r in rows if _setting(r) == st})]
    settings = curves or settings  # settings searched at several ratios; else whatever there is
    fig, axes = _grid(len(settings))
    for ax, setting in zip(axes, settings):
        for model, params in _models(rows):
            rs = [r for r in rows if _setting(r) == setting and r["model"] == model]
            if not rs:
                continue
            ax.scatter([r["achieved"] for r in rs], [100 * r["delta_ppl"] for r in rs], color=colors[model], s=14, alpha=0.6)
            x, env = laws.monotone_envelope([r["achieved"] for r in rs], [r["delta_ppl"] for r in rs])
            ax.plot(x, 100 * env, color=colors[model], label=f"{model} ({params / 1e6:.2g}M)")
        for b in budgets:
            ax.axhline(100 * b, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("quantization ratio Q_r (achieved)")
        ax.set_ylabel("delta perplexity (%)")
        ax.set_title(setting_label(setting), fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("delta_ppl against Q_r (dots: searches; lines: monotone envelope)", fontsize=10)
    _save(fig, path)


def fig_law1(analysis, path):
    """Paper Fig. 6: model size against 1 - Q_r,max, one fit per loss budget."""
    plt = _plt()
    settings = sorted({e["setting"] for e in analysis["law1"]}) or ["(no setting has a ratio curve)"]
    fig, axes = _grid(len(settings))
    cmap = plt.get_cmap("tab10")
    for ax, setting in zip(axes, settings):
        entries = [e for e in analysis["law1"] if e["setting"] == setting]
        if not any(e["points"] for e in entries):
            _empty(ax, f"{setting}\nno model reached a budget within its measured ratios:\nnothing to fit")
            continue
        for i, e in enumerate(entries):
            if not e["points"]:
                continue
            x = np.array([1 - p["max_ratio"] for p in e["points"]])
            y = np.array([p["params"] for p in e["points"]])
            label = f"{100 * e['budget']:g}%"
            if e["fit"]:
                f = laws.ExponentialFit(**e["fit"])
                xs = np.linspace(x.min(), x.max(), 50)
                ax.plot(xs, f.predict(xs), color=cmap(i))
                label += f": k={f.k:.1f}±{f.k_err:.1f}, R²={f.r2:.2f}"
            else:
                label += " (not fitted)"
            ax.scatter(x, y, color=cmap(i), label=label)
        ax.set_yscale("log")
        ax.set_xlabel("1 - Q_r,max (share of matmul parameters kept high)")
        ax.set_ylabel("model parameters")
        ax.set_title(setting, fontsize=9)
        ax.legend(fontsize=7, title="loss budget", title_fontsize=7)
    fig.suptitle("Law 1: size = exp(k (1 - Q_r,max) + c)", fontsize=10)
    _save(fig, path)


def fig_law2(analysis, path):
    """Paper Fig. 8: delta_ppl against block size at a fixed Q_r, log-log, with the power-law fit."""
    plt = _plt()
    entries = analysis["law2"]
    fig, axes = _grid(1, width=6.0, height=4.5)
    ax = axes[0]
    if not entries:
        _empty(ax, "no block-size sweep in these results\n(give grid.block_size several numeric sizes)")
    cmap = plt.get_cmap("tab10")
    for i, e in enumerate(entries):
        pts = [p for p in e["points"] if p["delta_ppl"] > 0]
        label = f"{e['model']}, {e['low']}{' W-only' if e['weights_only'] else ''}, Q_r {e['ratio']:g}"
        if e["fit"]:
            f = laws.PowerFit(**e["fit"])
            xs = np.geomspace(min(p["block_size"] for p in pts), max(p["block_size"] for p in pts), 50)
            ax.plot(xs, 100 * f.predict(xs), color=cmap(i % 10))
            label += f": k={f.k:.2f}±{f.k_err:.2f}"
        if pts:
            ax.scatter([p["block_size"] for p in pts], [100 * p["delta_ppl"] for p in pts], color=cmap(i % 10), label=label)
    if entries:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("block size (elements per shared scale)")
        ax.set_ylabel("delta perplexity (%)")
        ax.legend(fontsize=7)
    ax.set_title("Law 2: delta_ppl = A * block_size^k", fontsize=10)
    _save(fig, path)


def fig_bits(analysis, path):
    """Dettmers & Zettlemoyer's view: perplexity against total weight bits, with the Pareto front."""
    plt = _plt()
    bits = analysis["bits"]
    models = [m["model"] for m in analysis["models"]]
    cmap = plt.get_cmap("viridis")
    colors = {m: cmap(i / max(1, len(models) - 1) * 0.9) for i, m in enumerate(models)}
    fig, axes = _grid(1, width=6.5, height=4.5)
    ax = axes[0]
    for m in models:
        pts = [p for p in bits["points"] if p["model"] == m]
        ax.scatter([p["total_bits"] for p in pts], [p["ppl"] for p in pts], color=colors[m], s=14, label=m)
        base = [p for p in bits["baselines"] if p["model"] == m]
        ax.scatter([p["total_bits"] for p in base], [p["ppl"] for p in base], color=colors[m], marker="*", s=90)
    front = bits["pareto"]
    ax.plot([p["total_bits"] for p in front], [p["ppl"] for p in front], color="black", lw=1, drawstyle="steps-post",
            label="Pareto front")
    ax.set_xscale("log")
    ppl = [p["ppl"] for p in bits["points"] + bits["baselines"] if math.isfinite(p["ppl"])]
    if ppl and max(ppl) > 3 * min(ppl):  # a log axis only where perplexities span a wide range
        ax.set_yscale("log")
    ax.set_xlabel("total matmul weight bits (parameters x average bits, scales included)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Perplexity against model bits (stars: all high precision)", fontsize=10)
    ax.legend(fontsize=7)
    _save(fig, path)


def _save(fig, path) -> None:
    fig.tight_layout()
    with atomic_file(path, "wb") as f:  # a figure is never half written
        fig.savefig(f, format="png", dpi=110)
    _plt().close(fig)


def figures(rows, analysis, out_dir) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, f"{name}.png") for name in FIGURES}
    fig_ratio_vs_delta(rows, analysis["budgets"], paths["ratio_vs_delta"])
    fig_law1(analysis, paths["law1"])
    fig_law2(analysis, paths["law2"])
    fig_bits(analysis, paths["bits"])
    return paths


# ---- Markdown -----------------------------------------------------------------------------------


def _pm(value, err, fmt=".2f") -> str:
    return f"{value:{fmt}} ± {err:{fmt}}"


def markdown(analysis, figure_paths, *, source: str = "") -> str:
    a = analysis
    out = ["# Mixed-precision scaling laws: fitted report", ""]
    out += [f"Source: `{source}`, {a['n_rows']} searched cells, {len(a['models'])} models, "
            f"settings: {'; '.join(a['settings'])}. delta_ppl = (ppl_q - ppl_base) / ppl_base on held-out text.", ""]
    out += ["## Models", "", "| model | parameters | held-out perplexity (all high) |", "| --- | ---: | ---: |"]
    out += [f"| {m['model']} | {m['params']:,} | {m['ppl_base']:.3f} |" for m in a["models"]]

    out += ["", "## Largest quantization ratio within each loss budget", "",
            "Read off each model's ratio curve (achieved Q_r, made monotone: a plan found at a higher ratio "
            "also meets a lower one), interpolated linearly. `>=` marks a budget met at every measured "
            "ratio (a lower bound), `-` one never met.", ""]
    for setting in sorted({e["setting"] for e in a["law1"]}):
        out += [f"**{setting}**", "", "| model | " + " | ".join(f"{100 * b:g}%" for b in a["budgets"]) + " |",
                "| --- |" + " ---: |" * len(a["budgets"])]
        for m in a["models"]:
            cells = []
            for b in a["budgets"]:
                e = next((x for x in a["max_ratio"] if x["setting"] == setting and x["model"] == m["model"]
                          and x["budget"] == b), None)
                cells.append(_ratio_cell(e))
            out.append(f"| {m['model']} | " + " | ".join(cells) + " |")
        out.append("")

    out += ["## Law 1: size = exp(k (1 - Q_r,max) + c)", "",
            "x = 1 - Q_r,max, y = model parameters; least squares on ln y; ± one standard error; "
            f"R² of ln y. The paper (Qwen-1.5, matmul-wise): k = {PAPER['law1_k']['0.05']}, "
            f"{PAPER['law1_k']['0.1']}, {PAPER['law1_k']['0.2']} at 5/10/20%.", "",
            "| setting | budget | k | c | R² | models | paper k |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for e in a["law1"]:
        paper = PAPER["law1_k"].get(f"{e['budget']:g}", "")
        if e["fit"]:
            f = e["fit"]
            out.append(f"| {e['setting']} | {100 * e['budget']:g}% | {_pm(f['k'], f['k_err'])} | {_pm(f['c'], f['c_err'])} "
                       f"| {f['r2']:.3f} | {f['n']} | {paper} |")
        else:
            out.append(f"| {e['setting']} | {100 * e['budget']:g}% | - | - | - | {len(e['points'])} | {paper} |")
    notes = [f"- {e['setting']}, {100 * e['budget']:g}%: {e['note']}"
             + (f" (left out: {', '.join(f'{k} {v}' for k, v in e['left_out'].items())})" if e["left_out"] else "")
             for e in a["law1"] if e["note"]]
    out += ["", *notes, ""] if notes else [""]

    out += ["## Law 2: delta_ppl = A * block_size^k", ""]
    if not a["law2"]:
        out += ["No block-size sweep in these results (grid.block_size needs several numeric sizes). "
                f"The paper reports k between {PAPER['law2_k_range'][0]} and {PAPER['law2_k_range'][1]}.", ""]
    else:
        out += [f"Per model, format and asked Q_r over numeric block sizes. The paper: k between "
                f"{PAPER['law2_k_range'][0]} and {PAPER['law2_k_range'][1]}.", "",
                "| model | format | Q_r | A | k | R² | points | note |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for e in a["law2"]:
            fmt = f"{e['granularity']}, {e['low']}{' W-only' if e['weights_only'] else ''}"
            if e["fit"]:
                f = e["fit"]
                out.append(f"| {e['model']} | {fmt} | {e['ratio']:g} | {_pm(f['A'], f['A_err'], '.3g')} | "
                           f"{_pm(f['k'], f['k_err'])} | {f['r2']:.3f} | {f['n']} | {e['note']} |")
            else:
                out.append(f"| {e['model']} | {fmt} | {e['ratio']:g} | - | - | - | {len(e['points'])} | {e['note']} |")
        out.append("")

    out += ["## Bits view", "", "The Pareto front of held-out perplexity against total matmul weight bits "
            "(each point: lower perplexity than anything with fewer bits):", "",
            "| total bits | average bits | perplexity | model | configuration |", "| ---: | ---: | ---: | --- | --- |"]
    for p in a["bits"]["pareto"]:
        cfg = p["setting"] + (f", Q_r >= {p['ratio']:g}" if "ratio" in p else "")
        out.append(f"| {p['total_bits']:,} | {p['average_bits']:.2f} | {p['ppl']:.3f} | {p['model']} | {cfg} |")
    out += ["", "## Figures", ""]
    for name, path in figure_paths.items():
        out += [f"![{name}]({os.path.basename(path)})", ""]
    return "\n".join(out)


def _ratio_cell(e) -> str:
    if e is None:
        return ""
    if e["status"] == "never_reached":
        return "-"
    text = f"{'>= ' if e['status'] == 'above_measured' else ''}{e['max_ratio']:.3f}"
    reached = [s for s in e["per_seed"] if s is not None]
    if reached:  # several seeds: the range of their own curves (the search noise)
        spread = f"{min(reached):.3f}-{max(reached):.3f}" if len(reached) > 1 else f"{reached[0]:.3f}"
        missed = len(e["per_seed"]) - len(reached)
        never = f"; {missed} of {len(e['per_seed'])} never" if missed else ""
        text += f" (seeds: {spread}{never})"
    return text


def write_report(csv_path: str, out_dir: str, budgets=BUDGETS) -> dict[str, str]:
    """laws.json, four PNG figures and report.md in ``out_dir``; returns their paths."""
    rows = read_results(csv_path)
    analysis = analyze(rows, budgets)
    os.makedirs(out_dir, exist_ok=True)
    paths = figures(rows, analysis, out_dir)
    paths["json"] = os.path.join(out_dir, "laws.json")
    write_json_atomic(paths["json"], json_safe({"source": os.path.abspath(csv_path), **analysis}))
    paths["report"] = os.path.join(out_dir, "report.md")
    write_text_atomic(paths["report"], markdown(analysis, {k: paths[k] for k in FIGURES}, source=csv_path))
    return paths
