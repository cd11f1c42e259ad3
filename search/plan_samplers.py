"""Samplers that propose whole plans: the one-shot ``knapsack`` and the ``refine`` strategy.

Optuna's samplers propose one priority per component, which ``decode`` turns into a plan
inside the budget. These propose the set of low components itself, as one 0/1 parameter
``x:<component>`` per search variable, through Optuna's relative-sampling interface; so they
are ordinary ``BaseSampler``s: stored studies, resumed searches and several workers work as
with any other sampler, and what they propose is recorded in each trial's parameters.

``refine`` (the default strategy):

1. Its first plans are one-shot: the knapsack optimum of the empirical-Fisher scores
   (``knapsack``), and the knapsack optima of those scores blended with the same estimate
   taken at the all-low plan (what restoring each component would change). Interactions
   between components are large at 4 bits, so how much a component costs depends on what
   else is low: near the all-high plan at low ratios, near the all-low plan at high ones.
   Which linearization fits the budget is decided by measuring these plans.
2. After every completed trial it corrects the scores with the measured losses: the log
   perplexity of a plan is modelled as the all-high plan's plus the sum of its low
   components' costs, costs = gamma * score + delta, the score being the blend whose
   one-shot plan measured best, gamma fitted to the trials and delta a ridge correction
   per component.
3. It proposes the unseen plan of least predicted loss among budget-preserving moves around
   the best plans measured so far (an exchange of a low and a high component of similar
   size; at matmul granularity, a whole decoder layer raised or lowered with the budget
   restored elsewhere) and the knapsack optimum of the corrected costs; now and then (seeded)
   one of the next best, so one wrong estimate cannot stall it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import optuna
from optuna.distributions import IntDistribution
from optuna.trial import TrialState

from .knapsack import solve_knapsack

_MEET = 1e-9  # a plan meets its target when its sizes add up to target - this


@dataclasses.dataclass(frozen=True)
class PlanContext:
    """What a plan sampler knows of the search: its variables, their budget sizes and
    Fisher scores, the target, each variable's decoder layer (None outside the layers), the
    measured log loss of the all-high plan (the model's intercept; None if unknown), and
    the Fisher scores at the all-low plan (for samplers whose ``uses_low_scores``)."""

    names: tuple[str, ...]
    sizes: Mapping[str, float]
    target: float
    scores: Mapping[str, float]
    layers: Mapping[str, int | None]
    base_loss: float | None = None
    scores_low: Mapping[str, float] | None = None  # the Fisher estimate at the all-low plan

    def meets(self, low) -> bool:
        return sum(self.sizes[n] for n in low) >= self.target - _MEET

    def overshoot(self, low) -> float:
        return sum(self.sizes[n] for n in low) - self.target


class PlanSampler(optuna.samplers.BaseSampler):
    """Base of samplers that propose a set of low components; ``prepare`` gives them the search.

    ``start_plans()``: the one-shot plans the sampler measures first; the search re-scores
    them with its best plans before naming one, so a search never ends on a plan that
    lost to its own start on fresh windows."""

    uses_low_scores = False  # whether ``prepare`` needs the Fisher scores at the all-low plan

    def __init__(self, seed: int | None = None):
        self._rng = np.random.default_rng(seed)
        self._independent = optuna.samplers.RandomSampler(seed=seed)  # for parameters outside the plan
        self.context: PlanContext | None = None

    def prepare(self, context: PlanContext) -> None:
        self.context = context

    def infer_relative_search_space(self, study, trial):
        if self.context is None:
            return {}
        return {f"x:{n}": IntDistribution(0, 1) for n in self.context.names}

    def sample_relative(self, study, trial, search_space):
        if not search_space:
            return {}
        low = set(self.propose(study))
        return {f"x:{n}": int(n in low) for n in self.context.names}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._independent.sample_independent(study, trial, param_name, param_distribution)

    def propose(self, study: optuna.Study) -> list[str]:
        raise NotImplementedError

    def start_plans(self) -> list[frozenset[str]]:
        if self.context is None:
            return []
        plan = solve_knapsack(self.context.scores, self.context.sizes, self.context.target)
        return [frozenset(plan)] if plan is not None else []

    def tried(self, study: optuna.Study) -> list[frozenset[str]]:
        """Every plan already proposed in the study (running, pruned and failed ones too)."""
        out = []
        for t in study.get_trials(deepcopy=False):
            if t.params and all(k.startswith("x:") for k in t.params):
                out.append(frozenset(k[2:] for k, v in t.params.items() if v == 1))
        return out


class KnapsackSampler(PlanSampler):
    """The knapsack optimum of the Fisher scores; later trials take the next best plans."""

    def propose(self, study):
        plan = solve_knapsack(self.context.scores, self.context.sizes, self.context.target, exclude=self.tried(study))
        return plan if plan is not None else list(self.context.names)


class RefineSampler(PlanSampler):
    """One-shot plans first, then moves around the best plans scored by costs corrected with
    every completed trial's measured loss (see the module docstring).

    ``blends``: the weights w of the one-shot plans, each the knapsack optimum of
    (1 - w) * Fisher at all-high + w * Fisher at all-low (each scaled to mean 1); ``top``:
    how many of the best plans moves start from; ``explore``: the chance of taking one of
    the next ``explore_among`` best candidates instead of the best; ``ridge``: the strength
    of the prior that a component's cost is gamma times its score.
    """

    uses_low_scores = True

    def __init__(
        self,
        seed: int | None = None,
        *,
        blends: tuple[float, ...] = (0.0, 0.5, 1.0),
        top: int = 3,
        explore: float = 0.2,
        explore_among: int = 4,
        ridge: float = 1.0,
    ):
        super().__init__(seed)
        if not blends or any(not 0.0 <= w <= 1.0 for w in blends):
            raise ValueError(f"blends are weights in [0, 1], at least one, got {blends!r}")
        self.blends, self.top, self.explore, self.explore_among, self.ridge = blends, top, explore, explore_among, ridge
        self._starts: list[tuple[frozenset[str], dict[str, float]]] = []

    def prepare(self, context: PlanContext) -> None:
        super().prepare(context)
        self._starts = []
        for score in blended_scores(context, self.blends):
            plan = solve_knapsack(score, context.sizes, context.target)
            if plan is not None and frozenset(plan) not in self.start_plans():
                self._starts.append((frozenset(plan), score))

    def start_plans(self):
        return [plan for plan, _ in self._starts]

    def propose(self, study):
        ctx = self.context
        tried = set(self.tried(study))
        for plan, _ in self._starts:
            if plan not in tried:
                return sorted(plan)
        done = completed_plans(study)
        if not done:
            first = solve_knapsack(ctx.scores, ctx.sizes, ctx.target, exclude=tried)
            return first if first is not None else list(ctx.names)
        costs = corrected_costs(ctx, done, ridge=self.ridge, prior=self._prior(done))
        candidates = self._candidates(done, costs, tried)
        if not candidates:  # every nearby plan was tried: the next knapsack optimum
            nxt = solve_knapsack(costs_positive(costs), ctx.sizes, ctx.target, exclude=tried)
            return nxt if nxt is not None else list(ctx.names)
        ranked = sorted(candidates, key=lambda low: (_predicted(costs, low), sorted(low)))
        if len(ranked) > 1 and self._rng.random() < self.explore:
            return sorted(ranked[int(self._rng.integers(1, min(len(ranked), self.explore_among + 1)))])
        return sorted(ranked[0])

    def _prior(self, done) -> Mapping[str, float]:
        """The score whose one-shot plan measured best (the Fisher scores if none was measured)."""
        measured = dict(done)
        scored = [(measured[plan], score) for plan, score in self._starts if plan in measured]
        return min(scored, key=lambda s: s[0])[1] if scored else self.context.scores

    def _candidates(self, done, costs, tried) -> set[frozenset[str]]:
        ctx = self.context
        out = set()
        corrected = solve_knapsack(costs_positive(costs), ctx.sizes, ctx.target, exclude=tried)
        if corrected is not None:
            out.add(frozenset(corrected))
        for low, _ in sorted(done, key=lambda d: d[1])[: self.top]:
            out.update(exchanges(ctx, low, costs))
            out.update(layer_moves(ctx, low, costs))
        # Plans stay near the asked budget: no more over it than the one-shot plans were, or
        # 1% of the target, so the search compares plans at the budget, not beyond it.
        starts = [ctx.overshoot(p) for p in self.start_plans()] or [ctx.overshoot(done[0][0])]
        allowed = max(*starts, 0.01 * abs(ctx.target), _MEET)
        return {c for c in out if c not in tried and ctx.meets(c) and ctx.overshoot(c) <= allowed}


def completed_plans(study: optuna.Study) -> list[tuple[frozenset[str], float]]:
    """(low set, log loss) of every completed trial with a finite value."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        low = t.user_attrs.get("low")
        if low is None or t.value is None or not math.isfinite(t.value):
            continue
        out.append((frozenset(low), math.log(t.value) if t.value > 0 else t.value))
    return out


def blended_scores(ctx: PlanContext, weights) -> list[dict[str, float]]:
    """(1 - w) * the Fisher scores at all-high + w * those at all-low, each scaled to mean 1,
    for each weight w (only the all-high scores where the all-low ones are unknown)."""
    if ctx.scores_low is None:
        return [dict(ctx.scores)]
    high, low = _unit_mean(ctx.scores, ctx.names), _unit_mean(ctx.scores_low, ctx.names)
    return [{n: (1 - w) * high[n] + w * low[n] for n in ctx.names} for w in weights]


def _unit_mean(scores: Mapping[str, float], names) -> dict[str, float]:
    mean = float(np.mean([scores[n] for n in names])) if names else 0.0
    return {n: scores[n] / mean if mean > 0 else scores[n] for n in names}


def corrected_costs(
    ctx: PlanContext, done, *, ridge: float, prior: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Per-component costs c = gamma * score + delta fitted to the measured losses.

    loss(L) - base = sum_{c in L} cost_c; the score is ``prior`` (default: the Fisher scores),
    gamma by least squares on the score sums, delta the ridge solution of the residuals
    (dual form: trials are fewer than components).
    """
    names = list(ctx.names)
    index = {n: i for i, n in enumerate(names)}
    X = np.zeros((len(done), len(names)))
    for row, (low, _) in enumerate(done):
        X[row, [index[n] for n in low if n in index]] = 1.0
    y = np.array([loss for _, loss in done])
    prior = ctx.scores if prior is None else prior
    fisher = np.array([prior[n] for n in names])
    base = ctx.base_loss if ctx.base_loss is not None else float(np.min(y)) - 1e-3
    r = y - base
    f = X @ fisher
    gamma = float(f @ r / (f @ f)) if f @ f > 0 else 1.0
    gamma = max(gamma, 0.0)
    residual = r - gamma * f
    delta = X.T @ np.linalg.solve(X @ X.T + ridge * np.eye(len(done)), residual)
    return {n: float(gamma * fisher[i] + delta[i]) for n, i in index.items()}


def costs_positive(costs: Mapping[str, float]) -> dict[str, float]:
    # A knapsack over negative costs would send every such component low for free.
    return {n: max(c, 0.0) for n, c in costs.items()}


def _predicted(costs: Mapping[str, float], low) -> float:
    return sum(costs[n] for n in low)


def exchanges(ctx: PlanContext, low: frozenset[str], costs: Mapping[str, float], *, limit: int = 12):
    """Plans that raise one low component and lower one high one, keeping the budget."""
    slack = sum(ctx.sizes[n] for n in low) - ctx.target
    high = sorted((n for n in ctx.names if n not in low), key=lambda n: costs[n])
    raise_first = sorted(low, key=lambda n: -costs[n])[:limit]
    out = []
    for up in raise_first:
        need = ctx.sizes[up] - slack - _MEET  # the lowered one must be at least this large
        for down in high:
            if ctx.sizes[down] >= need:
                out.append((low - {up}) | {down})
                break  # the cheapest that keeps the budget
    return out


def layer_moves(ctx: PlanContext, low: frozenset[str], costs: Mapping[str, float]):
    """Raise or lower a whole decoder layer, restoring the budget with the best per-size others."""
    layers = sorted({ctx.layers[n] for n in ctx.names if ctx.layers[n] is not None})
    out = []
    for layer in layers:
        members = {n for n in ctx.names if ctx.layers[n] == layer}
        if members & low:
            out.append(_refill(ctx, low - members, costs, forbid=members))
        if members - low:
            out.append(_trim(ctx, low | members, costs, keep=members))
    return [p for p in out if p is not None]


def _refill(ctx, low: frozenset[str], costs, *, forbid) -> frozenset[str] | None:
    """``low`` plus the cheapest components per unit of budget until the target is met."""
    chosen, total = set(low), sum(ctx.sizes[n] for n in low)
    for n in sorted(
        (n for n in ctx.names if n not in low and n not in forbid), key=lambda n: costs[n] / max(ctx.sizes[n], 1e-300)
    ):
        if total >= ctx.target - _MEET:
            break
        chosen.add(n)
        total += ctx.sizes[n]
    return frozenset(chosen) if total >= ctx.target - _MEET else None


def _trim(ctx, low: frozenset[str], costs, *, keep) -> frozenset[str]:
    """``low`` less the costliest components per unit of budget that it can spare."""
    chosen, total = set(low), sum(ctx.sizes[n] for n in low)
    for n in sorted((n for n in low if n not in keep), key=lambda n: -costs[n] / max(ctx.sizes[n], 1e-300)):
        if total - ctx.sizes[n] >= ctx.target - _MEET:
            chosen.discard(n)
            total -= ctx.sizes[n]
    return frozenset(chosen)
