"""The report's five figures (matplotlib, Agg: files only), drawn from ``analyze()``'s output."""

from __future__ import annotations

import math
import os

import numpy as np

from mpqc.io import atomic_file
from mpqc.studies import laws
from mpqc.studies.report.analysis import _models, _setting, setting_label

__all__ = ["FIGURES", "fig_bits", "fig_law1", "fig_law1_slope", "fig_law2", "fig_ratio_vs_delta", "figures"]

FIGURES = ("ratio_vs_delta", "law1", "law1_slope", "law2", "bits")


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


def _title(label: str) -> str:
    """A setting label on two lines: the setting, then which parameters its Q_r counts."""
    return label.replace("; Q_r: ", "\nQ_r: ")


def _definitions(analysis) -> str:
    return "Q_r: " + " | ".join(analysis["q_r_definitions"])


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
    curves = [
        st
        for st in settings
        if len({(r["model"], r["ratio"]) for r in rows if _setting(r) == st})
        > len({r["model"] for r in rows if _setting(r) == st})
    ]
    settings = curves or settings  # settings searched at several ratios; else whatever there is
    fig, axes = _grid(len(settings))
    for ax, setting in zip(axes, settings):
        for model, params in _models(rows):
            rs = [r for r in rows if _setting(r) == setting and r["model"] == model]
            if not rs:
                continue
            ax.scatter(
                [r["achieved"] for r in rs], [100 * r["delta_ppl"] for r in rs], color=colors[model], s=14, alpha=0.6
            )
            x, env = laws.monotone_envelope([r["achieved"] for r in rs], [r["delta_ppl"] for r in rs])
            ax.plot(x, 100 * env, color=colors[model], label=f"{model} ({params / 1e6:.2g}M)")
        for b in budgets:
            ax.axhline(100 * b, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("quantization ratio Q_r (achieved)")
        ax.set_ylabel("delta perplexity (%)")
        ax.set_title(_title(setting_label(setting)), fontsize=9)
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
            _empty(ax, f"{_title(setting)}\nno model reached a budget within its measured ratios:\nnothing to fit")
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
        ax.set_xlabel("1 - Q_r,max (share of the parameters Q_r counts left high)")
        ax.set_ylabel("model parameters")
        ax.set_title(_title(setting), fontsize=9)
        ax.legend(fontsize=7, title="loss budget", title_fontsize=7)
    fig.suptitle("Law 1: size = exp(k (1 - Q_r,max) + c)", fontsize=10)
    _save(fig, path)


def fig_law1_slope(analysis, path):
    """Law 1 as a slope test: each seed's Q_r,max against log10(size), the fitted line, and the
    paper's implied slope drawn through the points' centre."""
    plt = _plt()
    settings = sorted({e["setting"] for e in analysis["law1"]}) or ["(no setting has a ratio curve)"]
    fig, axes = _grid(len(settings))
    cmap = plt.get_cmap("tab10")
    paper = analysis["paper"]["law1_slope_per_decade"]
    for ax, setting in zip(axes, settings):
        entries = [e for e in analysis["law1"] if e["setting"] == setting]
        if not any(e["slope_test"]["points"] for e in entries):
            _empty(ax, f"{_title(setting)}\nno seed's curve reached a budget within its ratios:\nnothing to test")
            continue
        for i, e in enumerate(entries):
            st = e["slope_test"]
            if not st["points"]:
                continue
            u = np.log10([p["params"] for p in st["points"]])
            q = np.array([p["max_ratio"] for p in st["points"]])
            label = f"{100 * e['budget']:g}%"
            if st["test"]:
                t = st["test"]
                us = np.linspace(u.min(), u.max(), 2)
                ax.plot(us, t["intercept"] + t["slope"] * us, color=cmap(i))
                ax.plot(us, q.mean() + paper * (us - u.mean()), color=cmap(i), ls=":", lw=1)
                label += f": {t['slope']:+.3f} [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}], p={t['p_value']:.2g}"
            else:
                label += " (not tested)"
            ax.scatter(u, q, color=cmap(i), s=14, alpha=0.7, label=label)
        ax.set_xlabel("log10(model parameters)")
        ax.set_ylabel("Q_r,max (one point per training x search seed)")
        ax.set_title(_title(setting), fontsize=9)
        ax.legend(fontsize=7, title="budget: slope per decade [95%]", title_fontsize=7)
    fig.suptitle(f"Law 1 as a slope test (dotted: the paper's {paper:+.3f} per decade)", fontsize=10)
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
        pts = [p for p in e["points"] if p["left_out"] is None]  # the points the fit used
        label = f"{e['model']}, {e['low']}{' W-only' if e['weights_only'] else ''}, Q_r {e['ratio']:g}"
        if e["fit"]:
            f = laws.PowerFit(**e["fit"])
            xs = np.geomspace(min(p["x"] for p in pts), max(p["x"] for p in pts), 50)
            ax.plot(xs, 100 * f.predict(xs), color=cmap(i % 10))
            label += f": k={f.k:.2f}±{f.k_err:.2f}"
        if pts:
            ax.scatter([p["x"] for p in pts], [100 * p["delta_ppl"] for p in pts], color=cmap(i % 10), label=label)
        for p in pts:
            if not isinstance(p["block_size"], int):  # per-vector / per-tensor: say which point it is
                ax.annotate(p["block_size"], (p["x"], 100 * p["delta_ppl"]), fontsize=6)
    if entries:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("block size (elements per shared scale; vector/tensor at their average)")
        ax.set_ylabel("delta perplexity (%)")
        ax.legend(fontsize=7)
    ax.set_title(f"Law 2: delta_ppl = A * block_size^k\n{_definitions(analysis)}", fontsize=9)
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
    _front_and_scales(ax, bits["pareto"], [p["ppl"] for p in bits["points"] + bits["baselines"]])
    ax.set_xlabel("total matmul weight bits (parameters x average bits, scales included)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"Perplexity against model bits (stars: all high precision)\n{_definitions(analysis)}", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def fig_bitlevel(rows, result, path):
    """``mpqc bitsweep``'s figure: held-out perplexity against total model bits, a colour per k,
    a marker per model, and the Pareto front of ``bitlevel.bit_optimal`` (``result``)."""
    plt = _plt()
    ks = sorted({r["bits"] for r in rows})
    cmap = plt.get_cmap("viridis")
    color = {k: cmap(i / max(1, len(ks) - 1) * 0.9) for i, k in enumerate(ks)}
    models = sorted({r["model"] for r in rows}, key=lambda m: min(r["params"] for r in rows if r["model"] == m))
    marker = {m: "osD^vP*X"[i % 8] for i, m in enumerate(models)}
    fig, axes = _grid(1, width=6.5, height=4.5)
    ax = axes[0]
    for r in rows:
        if math.isfinite(r["ppl"]):
            ax.scatter(r["total_bits"], r["ppl"], color=color[r["bits"]], marker=marker[r["model"]], s=16)
    for k in ks:
        ax.scatter([], [], color=color[k], marker="s", label=f"k = {k}")
    for m in models:
        ax.scatter([], [], color="grey", marker=marker[m], label=m)
    _front_and_scales(ax, result["pareto"], [r["ppl"] for r in rows])
    ax.set_xlabel("total model bits (matmul weights with their scales, other parameters at 16)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"Uniform k-bit weights: {result['verdict'].split(' (')[0]}", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    _save(fig, path)


def _front_and_scales(ax, front, ppls) -> None:
    """The Pareto front of perplexity against bits as a step line, bits on a log axis, and
    perplexity on one only where the finite ``ppls`` span a wide range."""
    ax.plot(
        [p["total_bits"] for p in front],
        [p["ppl"] for p in front],
        color="black",
        lw=1,
        drawstyle="steps-post",
        label="Pareto front",
    )
    ax.set_xscale("log")
    finite = [p for p in ppls if math.isfinite(p)]
    if finite and max(finite) > 3 * min(finite):
        ax.set_yscale("log")


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
    fig_law1_slope(analysis, paths["law1_slope"])
    fig_law2(analysis, paths["law2"])
    fig_bits(analysis, paths["bits"])
    return paths
