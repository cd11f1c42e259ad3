"""Naming the best plan on evidence: the best few contenders scored again on fresh windows.

A search ranks plans on its windows, and the best of many trials on those windows is partly
the best on their noise. So before the search names its plan, the ``k`` best distinct
completed plans (and the plans the strategy started from, when it has them: refine's
one-shot plans) are evaluated on further windows of the search text (the same windows for every
contender, never the held-out text), and the plan of least perplexity on those fresh windows
wins. The search windows chose the contenders; ranking them on the search windows again
would count the luck of that choice twice. ``decided`` records how many windows decided and
every contender's numbers.
"""

from __future__ import annotations

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
        plan = _low(t)
        if plan not in seen:
            seen.add(plan)
            out.append(t)
        if len(out) == k:
            break
    return out


def rescore(study: optuna.Study, runner: TrialRunner, extra_windows, k: int, *, anchors=()):
    """(the winning trial, what decided it) among the ``k`` best distinct plans, plus every
    completed trial of a plan in ``anchors`` (the plans the strategy started from); (None,
    None) when there is only one plan."""
    best = contenders(study, k)
    starts = _completed_of(study, {frozenset(a) for a in anchors})
    chosen = {_low(t) for t in best}
    best += [t for t in starts if _low(t) not in chosen]  # starts are distinct plans already
    if len(best) < 2:
        return None, None
    rows = []
    for t in best:
        extra = runner.evaluate_perplexity(runner.space.plan(t.user_attrs["low"]), windows=extra_windows)
        rows.append({"trial": t.number, "search_perplexity": t.user_attrs["perplexity"], "perplexity": extra})
    winner = min(range(len(best)), key=lambda i: (rows[i]["perplexity"], best[i].number))
    decided = {
        "windows": len(extra_windows),
        "search_windows": len(runner.perplexity.windows),
        "extra_windows": len(extra_windows),
        "contenders": rows,
        "anchors": [t.number for t in starts],
        "winner": best[winner].number,
    }
    return best[winner], decided


def _low(trial) -> frozenset[str]:
    return frozenset(trial.user_attrs.get("low", ()))


def _completed_of(study: optuna.Study, plans: set[frozenset[str]]) -> list:
    """The first completed trial of each plan in ``plans``, in trial order."""
    out, seen = [], set()
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.value is not None and _low(t) in plans and _low(t) not in seen:
            seen.add(_low(t))
            out.append(t)
    return out
