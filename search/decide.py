"""Naming the best plan on evidence: the best few contenders scored again on more windows.

A search ranks plans on its windows, and the best of many trials on those windows is partly
the best on their noise. So before the search names its plan, the ``k`` best distinct
completed plans are evaluated on further windows of the search text (the same windows for
every contender, never the held-out text) and the plan of least mean NLL over the search
windows and these together wins. ``decided`` records how many windows decided and every
contender's numbers.
"""

from __future__ import annotations

import math

import optuna
from optuna.trial import TrialState

from .trials import TrialRunner


def contenders(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """The ``k`` best completed trials with distinct plans, best first."""
    complete = sorted(
        (t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None),
        key=lambda t: (t.value, t.number),
    )
    out, seen = [], set()
    for t in complete:
        plan = frozenset(t.user_attrs.get("low", ()))
        if plan not in seen:
            seen.add(plan)
            out.append(t)
        if len(out) == k:
            break
    return out


def rescore(study: optuna.Study, runner: TrialRunner, extra_windows, k: int):
    """(the winning trial, what decided it) among the ``k`` best distinct plans; (None, None)
    when there is only one plan to choose from."""
    best = contenders(study, k)
    if len(best) < 2:
        return None, None
    n_search, n_extra = len(runner.perplexity.windows), len(extra_windows)
    rows = []
    for t in best:
        extra = runner.evaluate_perplexity(runner.space.plan(t.user_attrs["low"]), windows=extra_windows)
        search = t.user_attrs["perplexity"]
        combined = _combined(search, n_search, extra, n_extra)
        rows.append({"trial": t.number, "search_perplexity": search, "extra_perplexity": extra, "perplexity": combined})
    winner = min(range(len(best)), key=lambda i: (rows[i]["perplexity"], best[i].number))
    decided = {
        "windows": n_search + n_extra,
        "search_windows": n_search,
        "extra_windows": n_extra,
        "contenders": rows,
        "winner": best[winner].number,
    }
    return best[winner], decided


def _combined(ppl_a: float, n_a: int, ppl_b: float, n_b: int) -> float:
    """Perplexity over both window sets (equal lengths): the window-weighted mean of log perplexities."""
    if not (math.isfinite(ppl_a) and math.isfinite(ppl_b)):
        return math.inf
    return math.exp((n_a * math.log(ppl_a) + n_b * math.log(ppl_b)) / (n_a + n_b))
