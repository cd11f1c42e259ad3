"""report.md: the fitted laws as Markdown tables, one section after another."""

from __future__ import annotations

import os

from mpqc.studies.report.analysis import LAW2_MAX_DELTA, LAW2_MAX_RATIO, PAPER

__all__ = ["markdown"]


def _pm(value, err, fmt=".2f") -> str:
    return f"{value:{fmt}} ± {err:{fmt}}"


def markdown(analysis, figure_paths, *, source: str = "") -> str:
    a = analysis
    out = _models_section(a, source)
    out += _max_ratio_section(a)
    out += _law1_section(a)
    out += _slope_section(a)
    out += _law2_section(a)
    out += _granularity_section(a)
    out += _bits_section(a)
    out += _figures_section(figure_paths)
    return "\n".join(out)


def _models_section(a, source: str) -> list[str]:
    out = ["# Mixed-precision scaling laws: fitted report", ""]
    out += [
        f"Source: `{source}`, {a['n_rows']} searched cells, {len(a['models'])} models, "
        f"settings: {' | '.join(a['settings'])}. delta_ppl = (ppl_q - ppl_base) / ppl_base on held-out text. "
        f"Model size: {a.get('size', 'all parameters')}.",
        "",
        "Which parameters Q_r counts (components kept high are out of its numerator and denominator): "
        + "; ".join(f"`{d}`" for d in a["q_r_definitions"])
        + ".",
        "",
    ]
    out += ["## Models", "", "| model | parameters | held-out perplexity (all high) |", "| --- | ---: | ---: |"]
    out += [f"| {m['model']} | {m['params']:,} | {m['ppl_base']:.3f} |" for m in a["models"]]
    return out


def _max_ratio_section(a) -> list[str]:
    out = [
        "",
        "## Largest quantization ratio within each loss budget",
        "",
        "Read off each model's ratio curve (achieved Q_r, made monotone: a plan found at a higher ratio "
        "also meets a lower one), interpolated linearly. `>=` marks a budget met at every measured "
        "ratio below 1 (a lower bound), `-` one never met; 1.000 is a budget met with every searchable "
        "matmul low (exact: no larger Q_r exists).",
        "",
    ]
    for setting in sorted({e["setting"] for e in a["law1"]}):
        out += [
            f"**{setting}**",
            "",
            "| model | " + " | ".join(f"{100 * b:g}%" for b in a["budgets"]) + " |",
            "| --- |" + " ---: |" * len(a["budgets"]),
        ]
        for m in a["models"]:
            cells = []
            for b in a["budgets"]:
                e = next(
                    (
                        x
                        for x in a["max_ratio"]
                        if x["setting"] == setting and x["model"] == m["model"] and x["budget"] == b
                    ),
                    None,
                )
                cells.append(_ratio_cell(e))
            if any(cells):  # a model this setting never ran (e.g. fam-0 layer-wise) gets no row
                out.append(f"| {m['model']} | " + " | ".join(cells) + " |")
        out.append("")
    return out


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


def _law1_section(a) -> list[str]:
    out = [
        "## Law 1: size = exp(k (1 - Q_r,max) + c)",
        "",
        "x = 1 - Q_r,max, y = model parameters; least squares on ln y; ± one standard error; "
        f"R² of ln y. The paper (Qwen-1.5, matmul-wise): k = {PAPER['law1_k']['0.05']}, "
        f"{PAPER['law1_k']['0.1']}, {PAPER['law1_k']['0.2']} at 5/10/20%.",
        "",
        "| setting | budget | k | c | R² | models | paper k |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in a["law1"]:
        paper = PAPER["law1_k"].get(f"{e['budget']:g}", "")
        if e["fit"]:
            f = e["fit"]
            out.append(
                f"| {e['setting']} | {100 * e['budget']:g}% | {_pm(f['k'], f['k_err'])} | {_pm(f['c'], f['c_err'])} "
                f"| {f['r2']:.3f} | {f['n']} | {paper} |"
            )
        else:
            out.append(f"| {e['setting']} | {100 * e['budget']:g}% | - | - | - | {len(e['points'])} | {paper} |")
    notes = [
        f"- {e['setting']}, {100 * e['budget']:g}%: {e['note']}"
        + (f" (left out: {', '.join(f'{k} {v}' for k, v in e['left_out'].items())})" if e["left_out"] else "")
        for e in a["law1"]
        if e["note"]
    ]
    out += ["", *notes, ""] if notes else [""]
    return out


def _slope_section(a) -> list[str]:
    paper = PAPER["law1_slope_per_decade"]
    out = [
        "## Law 1 as a slope test: Q_r,max against log10(size)",
        "",
        "One point per (model, training seed, search seed) with a read Q_r,max (interpolated, or 1 where "
        "the all-low plan meets the budget); ordinary least "
        "squares of Q_r,max on log10(parameters), the slope per decade of size with a 95% bootstrap "
        "interval (clusters: the seeds a point shares, resampled whole), and the one-sided p-value of "
        f"slope > 0. The paper's k = {PAPER['law1_slope_k']} implies {paper:+.3f} per decade.",
        "",
        "| setting | budget | slope per decade | 95% interval | p (slope > 0) | points | sizes | resampled | paper |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    verdicts = []
    for e in a["law1"]:
        st, budget = e["slope_test"], f"{100 * e['budget']:g}%"
        t = st["test"]
        if t:
            out.append(
                f"| {e['setting']} | {budget} | {t['slope']:+.3f} | [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}] | "
                f"{t['p_value']:.3g} | {t['n']} | {t['n_sizes']} | {st['resampled']} | {paper:+.3f} |"
            )
        else:
            out.append(f"| {e['setting']} | {budget} | - | - | - | {len(st['points'])} | - | - | {paper:+.3f} |")
        left = ", ".join(f"{n} {status}" for status, n in st["left_out"].items())
        verdicts.append(f"- {e['setting']}, {budget}: {st['verdict']}" + (f" (left out: {left})" if left else ""))
    return out + ["", *verdicts, ""]


def _law2_section(a) -> list[str]:
    out = ["## Law 2: delta_ppl = A * block_size^k", ""]
    if not a["law2"]:
        out += [
            "No block-size sweep in these results (grid.block_size needs several numeric sizes). "
            f"The paper reports k between {PAPER['law2_k_range'][0]} and {PAPER['law2_k_range'][1]}.",
            "",
        ]
        return out
    out += [
        "Per model, format and asked Q_r over its block sizes, by the paper's rules: asked Q_r up to "
        f"{LAW2_MAX_RATIO:g}, points above {100 * LAW2_MAX_DELTA:g}% delta_ppl left out, per-vector and "
        "per-tensor blocks placed at their average elements per scale. The paper: k between "
        f"{PAPER['law2_k_range'][0]} and {PAPER['law2_k_range'][1]}.",
        "",
        "| model | format | Q_r | A | k | R² | points | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for e in a["law2"]:
        fmt = f"{e['granularity']}, {e['low']}{' W-only' if e['weights_only'] else ''}"
        if e["fit"]:
            f = e["fit"]
            out.append(
                f"| {e['model']} | {fmt} | {e['ratio']:g} | {_pm(f['A'], f['A_err'], '.3g')} | "
                f"{_pm(f['k'], f['k_err'])} | {f['r2']:.3f} | {f['n']} | {e['note']} |"
            )
        else:
            out.append(f"| {e['model']} | {fmt} | {e['ratio']:g} | - | - | - | {len(e['points'])} | {e['note']} |")
    return out + _law2_size_lines(a)


def _law2_size_lines(a) -> list[str]:
    sizes = [e for e in a.get("law2_by_size", []) if e["pooled"] is not None]
    if not sizes:
        return [""]
    out = [
        "",
        "Per size (the fitted models of one size, e.g. its training seeds): each one's k, and one fit "
        "through all their points (k ± one standard error).",
        "",
        "| size | format | Q_r | models | elements per scale | k each | k mean (range) | pooled k | pooled R² |",
        "| ---: | --- | ---: | ---: | --- | --- | --- | ---: | ---: |",
    ]
    for e in sizes:
        fmt = f"{e['granularity']}, {e['low']}{' W-only' if e['weights_only'] else ''}"
        p = e["pooled"]
        out.append(
            f"| {e['params']:,} | {fmt} | {e['ratio']:g} | {len(e['models'])} | "
            f"{e['x_range'][0]:.3g} to {e['x_range'][1]:.3g} | {', '.join(f'{k:.2f}' for k in e['k'])} | {e['k_mean']:.2f} ({e['k_min']:.2f} to {e['k_max']:.2f}) | "
            f"{_pm(p['k'], p['k_err'])} | {p['r2']:.3f} |"
        )
    return out + [""]


def _granularity_section(a) -> list[str]:
    if not a["granularity"]:
        return []  # no layer-wise rows with matmul-wise curves of the same models
    out = [
        "## Layer-wise against matmul-wise at equal Q_r",
        "",
        "Each layer-wise plan's delta_ppl minus the matmul-wise delta_ppl of the same model, training "
        "seed, search seed and format, read off the matmul-wise curve (monotone, linear) at the "
        "layer-wise plan's achieved Q_r. Positive: the layer-wise plan loses more. At Q_r = 1 both "
        "put every weight matmul low; what differs there is the attention matmuls (no weights), which "
        "a layer-wise plan quantizes with their layer and a matmul-wise search may keep high at no "
        "cost to Q_r.",
        "",
        "| size | format | achieved Q_r < 1 | pairs | mean | median | range | layer-wise worse | max abs at Q_r = 1 |",
        "| ---: | --- | --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for e in a["granularity"]:
        fmt = f"{e['low']}{' W-only' if e['weights_only'] else ''}, block {e['block_size']}"
        qs = ", ".join(f"{q:.3g}" for q in e["achieved"])
        at_one = "-" if e["all_low_max_abs"] is None else f"{100 * e['all_low_max_abs']:.2g} pp"
        if e["n"]:
            stats = (
                f"{100 * e['mean']:+.2f} pp | {100 * e['median']:+.2f} pp | "
                f"{100 * e['min']:+.2f} to {100 * e['max']:+.2f} pp | {e['layer_worse']} of {e['n']}"
            )
        else:
            stats = "- | - | - | -"
        out.append(f"| {e['params']:,} | {fmt} | {qs} | {e['n']} | {stats} | {at_one} |")
    return out + [""]


def _bits_section(a) -> list[str]:
    out = [
        "## Bits view",
        "",
        "The Pareto front of held-out perplexity against total matmul weight bits "
        "(each point: lower perplexity than anything with fewer bits):",
        "",
        "| total bits | average bits | perplexity | model | configuration |",
        "| ---: | ---: | ---: | --- | --- |",
    ]
    for p in a["bits"]["pareto"]:
        cfg = p["setting"] + (f", Q_r >= {p['ratio']:g}" if "ratio" in p else "")
        out.append(f"| {p['total_bits']:,} | {p['average_bits']:.2f} | {p['ppl']:.3f} | {p['model']} | {cfg} |")
    return out


def _figures_section(figure_paths) -> list[str]:
    out = ["", "## Figures", ""]
    for name, path in figure_paths.items():
        out += [f"![{name}]({os.path.basename(path)})", ""]
    return out
