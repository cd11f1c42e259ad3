"""From a sweep's results CSV to fitted laws (JSON), figures (PNG) and a Markdown report.

    paths = mpqc.studies.report.write_report("runs/sweep_small.csv", "runs/sweep_small")   # also: mpqc fit

* Q_r,max per model and loss budget (5/10/20% delta_ppl by default), read off each model's
  ratio curve (achieved Q_r against held-out delta_ppl, made monotone), per setting
  (granularity, low format, weights-only, block size); with several seeds, also per seed.
* Law 1 per setting and budget: size = exp(k * (1 - Q_r,max) + c) over the models whose
  Q_r,max was read (interpolated, or 1 where the all-low plan meets the budget; at least three),
  size = all model parameters.
* Law 1 as a test, beside the fit: the slope of Q_r,max on log10(size) over every (model,
  training seed, search seed), its 95% cluster-bootstrap interval, the one-sided p-value of
  slope > 0 and a verdict against the paper's implied +0.197 per decade.
* Law 2 per model, setting and asked Q_r: delta_ppl = A * block_size^k by the paper's rules (asked
  Q_r up to 0.95, points above 100% delta_ppl left out, per-vector/per-tensor at their average
  elements per scale).
* The bits view (Dettmers & Zettlemoyer): held-out perplexity against total matmul weight bits,
  with the Pareto front (the bit-optimal configurations).

    mpqc.studies.report.analysis   the numbers (Q_r,max, the fits, the bits view): analyze()
    mpqc.studies.report.figures    the five PNG figures: figures()
    mpqc.studies.report.markdown   report.md: markdown()

This package re-exports their names (``report.analyze``, ``report.BUDGETS``, ``report.FIGURES``,
...); ``report.figures`` and ``report.markdown`` are the functions, which shadow their modules'
attribute names (import the modules with ``importlib.import_module`` if ever needed).
"""

from __future__ import annotations

import math
import os

from mpqc.io import json_safe, write_json_atomic, write_text_atomic

# Every name below stays reachable as mpqc.studies.report.<name>.
from mpqc.studies.report.analysis import (  # noqa: F401
    BUDGETS,
    LAW2_MAX_DELTA,
    LAW2_MAX_RATIO,
    PAPER,
    SETTING_KEYS,
    analyze,
    bits_view,
    law1_fits,
    law1_slope_test,
    law2_fits,
    law2_position,
    max_ratios,
    seed_max_ratios,
    setting_label,
    slope_verdict,
)
from mpqc.studies.report.figures import (  # noqa: F401
    FIGURES,
    fig_bits,
    fig_law1,
    fig_law1_slope,
    fig_law2,
    fig_ratio_vs_delta,
    figures,
)
from mpqc.studies.report.markdown import markdown
from mpqc.studies.sweep import read_results

__all__ = ["BUDGETS", "PAPER", "analyze", "figures", "markdown", "write_report"]


SIZES = {"total": "all parameters", "non_embedding": "parameters without the token embedding (and an untied output)"}


def write_report(csv_path: str, out_dir: str, budgets=BUDGETS, *, size: str = "total") -> dict[str, str]:
    """laws.json, five PNG figures and report.md in ``out_dir``; returns their paths. ``size``:
    what the laws take as model size, "total" (the ``params`` column) or "non_embedding"
    (``params_non_embedding``, Kaplan et al.'s count, which spans more of a small family)."""
    rows = sized_rows(read_results(csv_path), size, where=csv_path)
    analysis = {**analyze(rows, budgets), "size": SIZES[size]}
    os.makedirs(out_dir, exist_ok=True)
    paths = figures(rows, analysis, out_dir)
    paths["json"] = os.path.join(out_dir, "laws.json")
    write_json_atomic(paths["json"], json_safe({"source": os.path.abspath(csv_path), **analysis}))
    paths["report"] = os.path.join(out_dir, "report.md")
    write_text_atomic(paths["report"], markdown(analysis, {k: paths[k] for k in FIGURES}, source=csv_path))
    return paths


def sized_rows(rows: list[dict], size: str, *, where: str) -> list[dict]:
    """``rows`` with ``params`` the model size the laws are fitted over."""
    if size not in SIZES:
        raise ValueError(f"size is one of {', '.join(SIZES)}, got {size!r}")
    if size == "total":
        return rows
    missing = sorted({r["model"] for r in rows if not _recorded(r.get("params_non_embedding"))})
    if missing:
        raise ValueError(
            f"{where}: models {missing} have no params_non_embedding (results written before sweeps "
            "recorded it); rerun their cells into a new file, or fit with size total"
        )
    return [{**r, "params": r["params_non_embedding"]} for r in rows]


def _recorded(value) -> bool:
    # an empty cell reads as NaN (mpqc.io.parse_cell)
    return value not in (None, "") and not (isinstance(value, float) and math.isnan(value))
