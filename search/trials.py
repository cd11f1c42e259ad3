"""One trial: a plan inside the budget (from the sampler) -> its measured loss.

``TrialRunner`` is the Optuna objective function of a search. It owns nothing but the
compiled model it switches (``set_plan``: no recapture, weights cached per format) and the
objectives that score it. Optuna's samplers propose one priority per search variable, which
``decode`` turns into a plan that meets the budget; mpqc's plan samplers propose the set of
low components directly (``plan_samplers``). With a pruner, the window perplexity is
reported after each chunk of windows and a trial that cannot win stops early.
"""

from __future__ import annotations

import math
import os
import socket

import optuna

from mpqc.compile import QuantizedModel
from mpqc.evaluate import window_nlls
from mpqc.plan import Plan

from .budget import SearchSpace, decode
from .objective import WindowPerplexity


class TrialRunner:
    """Scores plans of ``space`` on ``qmodel``: window perplexity always, and ``objective``
    (e.g. an lm-eval task) when given; the study minimizes the objective's loss, else perplexity.
    With ``multi`` (nsga2) the trial also searches its own target ratio. ``steps`` > 1 reports
    the running perplexity that many times per trial, for the study's pruner."""

    gate = None  # a workers.TrialGate, set by run(): skips surplus trials and plans already measured

    def __init__(
        self,
        qmodel: QuantizedModel,
        space: SearchSpace,
        perplexity: WindowPerplexity,
        *,
        objective=None,
        multi: bool = False,
        plan_sampler: bool = False,
        steps: int = 1,
    ):
        self.qmodel, self.space, self.perplexity = qmodel, space, perplexity
        self.objective, self.multi, self.plan_sampler = objective, multi, plan_sampler
        self.steps = steps if objective is None and not multi else 1
        variables = space.variables()
        sizes = space.sizes()
        self.names = [c.name for c in variables]
        self.sizes = {n: sizes[n] for n in self.names}
        self.target = space.target()
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def evaluate_perplexity(self, plan: Plan, *, eager: bool = False) -> float:
        self.qmodel.set_plan(plan)
        if eager:
            w = self.perplexity.windows
            return WindowPerplexity(w, min(self.perplexity.batch_size, len(w))).evaluate(self.qmodel).value
        return self.perplexity.evaluate(self.qmodel).value

    def window_nlls(self, plan: Plan, windows):
        """The mean NLL of each of ``windows`` under ``plan`` (float64 [n], CPU), in batches
        shaped like the search's own: what a paired comparison of plans on those windows needs."""
        self.qmodel.set_plan(plan)
        run = self.qmodel if self.perplexity.forward is None else self.perplexity.forward
        batch = min(self.perplexity.batch_size, len(self.perplexity.windows))
        return window_nlls(run, windows, batch_size=batch)

    def measure(self, plan: Plan, trial: optuna.Trial | None = None) -> tuple[float, dict]:
        """(what the study minimizes, what the trial records) for ``plan``."""
        ppl = self._perplexity(plan, trial)
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

    def _perplexity(self, plan: Plan, trial: optuna.Trial | None) -> float:
        if trial is None or self.steps == 1:
            return self.evaluate_perplexity(plan)
        self.qmodel.set_plan(plan)
        n = len(self.perplexity.windows)
        for step, value in enumerate(self.perplexity.running(self.qmodel, self.steps)):
            trial.report(value, step)
            if step < self.steps - 1 and trial.should_prune():
                trial.set_user_attr("windows", round(n * (step + 1) / self.steps))
                trial.set_user_attr("perplexity_partial", value)
                raise optuna.TrialPruned(f"running perplexity {value:.4f} after chunk {step + 1} of {self.steps}")
        return value

    def choose(self, trial: optuna.Trial) -> tuple[list[str], float]:
        """The low components of this trial's plan, and the target it had to meet."""
        goal = self.target
        if self.multi:  # the ratio itself is searched: one study spans the Pareto front
            goal = trial.suggest_float("target", self.target, max(self.target, sum(self.sizes.values())))
        if self.plan_sampler:
            chosen = [n for n in self.names if trial.suggest_int(f"x:{n}", 0, 1) == 1]
            if sum(self.sizes[n] for n in chosen) < goal - 1e-9:
                raise ValueError(f"the sampler proposed a plan below the budget ({len(chosen)} low components)")
            return chosen, goal
        priorities = {n: trial.suggest_float(f"p:{n}", 0.0, 1.0) for n in self.names}
        return decode(priorities, self.sizes, goal), goal

    def __call__(self, trial: optuna.Trial):
        trial.set_user_attr("worker", self.worker)  # first: a trial that has begun is not an orphan (workers)
        chosen, _ = self.choose(trial)
        plan = self.space.plan(chosen)
        if self.gate is not None and (earlier := self.gate(trial, chosen)) is not None:
            return tuple(earlier.values) if self.multi else earlier.value  # measured already: reused
        summary = plan.summary()
        attrs = {**summary, "achieved": self.space.achieved(plan), "low": chosen}
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        loss, measured = self.measure(plan, trial)
        for key, value in {**measured, "windows": len(self.perplexity.windows)}.items():
            trial.set_user_attr(key, value)
        return (loss, summary["quantization_ratio_params"]) if self.multi else loss
