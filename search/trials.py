"""One trial: priorities from the sampler -> a plan inside the budget -> its measured loss.

``TrialRunner`` is the Optuna objective function of a search. It owns nothing but the
compiled model it switches (``set_plan``: no recapture, weights cached per format) and the
objectives that score it.
"""

from __future__ import annotations

import math
import os
import socket

import optuna

from mpqc.compile import QuantizedModel
from mpqc.plan import Plan

from .budget import SearchSpace, decode
from .objective import WindowPerplexity


class TrialRunner:
    """Scores plans of ``space`` on ``qmodel``: window perplexity always, and ``objective``
    (e.g. an lm-eval task) when given; the study minimizes the objective's loss, else perplexity.
    With ``multi`` (nsga2) the trial also searches its own target ratio."""

    def __init__(
        self,
        qmodel: QuantizedModel,
        space: SearchSpace,
        perplexity: WindowPerplexity,
        *,
        objective=None,
        multi: bool = False,
    ):
        self.qmodel, self.space, self.perplexity = qmodel, space, perplexity
        self.objective, self.multi = objective, multi
        self.sizes, self.target = space.sizes(), space.target()
        self.names = [c.name for c in space.components]
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def evaluate_perplexity(self, plan: Plan, *, eager: bool = False) -> float:
        self.qmodel.set_plan(plan)
        scorer = WindowPerplexity(self.perplexity.windows, self.perplexity.batch_size) if eager else self.perplexity
        return scorer.evaluate(self.qmodel).value

    def measure(self, plan: Plan) -> tuple[float, dict]:
        """(what the study minimizes, what the trial records) for ``plan``."""
        ppl = self.evaluate_perplexity(plan)
        if self.objective is None:
            return ppl, {"perplexity": ppl}
        score = self.objective.evaluate(self.qmodel)  # the same compiled model, now on ``plan``
        loss = float(score.loss)
        loss = loss if math.isfinite(loss) else math.inf
        return loss, {
            "perplexity": ppl,
            "objective": loss,
            "metric": float(score.value),
            "metric_name": score.metric,
            "higher_is_better": bool(getattr(score, "higher_is_better", False)),
        }

    def __call__(self, trial: optuna.Trial):
        goal = self.target
        if self.multi:  # the ratio itself is searched: one study spans the Pareto front
            goal = trial.suggest_float("target", self.target, max(self.target, sum(self.sizes.values())))
        priorities = {n: trial.suggest_float(f"p:{n}", 0.0, 1.0) for n in self.names}
        chosen = decode(priorities, self.sizes, goal)
        plan = self.space.plan(chosen)
        loss, measured = self.measure(plan)
        summary = plan.summary()
        attrs = {**summary, **measured, "achieved": self.space.achieved(plan), "low": chosen, "worker": self.worker}
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return (loss, summary["quantization_ratio_params"]) if self.multi else loss
