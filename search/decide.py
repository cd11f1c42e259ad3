"""Naming the best plan on evidence: the best few contenders scored again on fresh windows.

A search ranks plans on its windows, and the best of many trials on those windows is partly
the best on their noise. So before the search names its plan, the ``k`` best distinct
completed plans (and the plans the strategy started from, when it has them: refine's
one-shot plans) are evaluated on further windows of the search text (the same windows for every
contender, never the held-out text), and the plan of least perplexity on those fresh windows
wins; with a confidence, where the strategy started from a one-shot plan, another replaces it
only if it is better on those windows by a paired interval. The search windows chose the
contenders; ranking them on the search windows again would count the luck of that choice
twice. ``decided`` records how many windows decided and every contender's numbers.
"""

from __future__ import annotations

import math

import optuna
import torch
from optuna.trial import TrialState
from scipy.stats import t as student_t

from .objective import perplexity_of
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


def rescored(study: optuna.Study, k: int, anchors=()) -> list[optuna.trial.FrozenTrial]:
    """The trials ``rescore`` would score now: the ``k`` best distinct plans, then the
    completed plans of ``anchors`` not among them."""
    best = contenders(study, k)
    chosen = {_low(t) for t in best}
    starts = _completed_of(study, {frozenset(a) for a in anchors})
    return best + [t for t in starts if _low(t) not in chosen]  # starts are distinct plans already


def rescore(study: optuna.Study, runner: TrialRunner, extra_windows, k: int, *, anchors=(), confidence=None):
    """(the winning trial, what decided it) among the ``k`` best distinct plans, plus every
    completed trial of a plan in ``anchors`` (the plans the strategy started from); (None,
    None) when there is only one plan.

    With anchors and a ``confidence``, the first anchor (the strategy's own first guess: the
    knapsack plan) is the reference: another contender replaces it only if its per-window NLL
    on the fresh windows is lower by a paired one-sided interval at ``confidence`` (a t
    interval over the windows), and then the least perplexity among those that are wins. A
    challenger that won by the luck of a few windows would otherwise undo a sound one-shot
    plan. Without anchors, or with ``confidence`` None, the least perplexity wins.
    """
    best = rescored(study, k, anchors)
    if len(best) < 2:
        return None, None
    starts = _completed_of(study, {frozenset(a) for a in anchors})
    nlls = [runner.window_nlls(runner.space.plan(t.user_attrs["low"]), extra_windows) for t in best]
    reference = _index_of(best, anchors[0]) if anchors and confidence is not None else None
    rows = [_row(t, n, None if reference is None else nlls[reference], confidence) for t, n in zip(best, nlls)]
    eligible = [i for i, row in enumerate(rows) if reference is None or i == reference or row["evidence"]]
    winner = min(eligible, key=lambda i: (rows[i]["perplexity"], best[i].number))
    decided = {
        "windows": len(extra_windows),
        "search_windows": len(runner.perplexity.windows),
        "extra_windows": len(extra_windows),
        "contenders": rows,
        "anchors": [t.number for t in starts],
        "reference": None if reference is None else best[reference].number,
        "confidence": None if reference is None else confidence,
        "winner": best[winner].number,
    }
    return best[winner], decided


def _row(trial, nlls: torch.Tensor, reference: torch.Tensor | None, confidence) -> dict:
    """A contender's numbers on the fresh windows; against the reference, its mean NLL gain
    per window, the one-sided lower bound of that gain, and whether the bound is above zero."""
    row = {"trial": trial.number, "search_perplexity": trial.user_attrs["perplexity"]}
    row["perplexity"] = perplexity_of(float(nlls.mean()))
    if reference is not None:
        gain, lower = paired_gain(reference, nlls, confidence)
        row.update(nll_gain=gain, nll_gain_lower=lower, evidence=lower > 0)
    return row


def paired_gain(reference: torch.Tensor, challenger: torch.Tensor, confidence: float) -> tuple[float, float]:
    """(mean of reference - challenger per-window NLL, its one-sided lower bound at ``confidence``).

    A t interval on the paired differences: the windows are the samples, so plans measured on
    the same windows are compared without the windows' own spread. A challenger with a
    non-finite NLL never has evidence; one finite against a diverged reference always has."""
    if not bool(torch.isfinite(challenger).all()):
        return -math.inf, -math.inf
    if not bool(torch.isfinite(reference).all()):
        return math.inf, math.inf
    d = (reference - challenger).double()
    gain = float(d.mean())
    if len(d) < 2:
        return gain, -math.inf
    spread = float(d.std()) / math.sqrt(len(d))
    return gain, gain - float(student_t.ppf(confidence, len(d) - 1)) * spread


def _index_of(trials, plan) -> int | None:
    """The position of the trial of ``plan`` among ``trials`` (None: not measured to the end)."""
    return next((i for i, t in enumerate(trials) if _low(t) == frozenset(plan)), None)


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
