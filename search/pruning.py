"""Stopping trials that cannot win: intermediate values on shared window chunks, pruned
against the incumbent.

Every trial evaluates the same windows in the same order, in chunks, and reports its
running perplexity after each chunk. The comparison is paired: the incumbent (the best
completed trial) reported its own running perplexity on exactly those windows. A trial is
pruned once it is worse than the incumbent at the same step by more than a margin that
shrinks as more windows decide (``tolerance * sqrt(n_steps / (step + 1))``); the last
step is never pruned, so a trial that survives to the end is scored on every window and
only completed trials compete for the best plan.
"""

from __future__ import annotations

import math

import optuna
from optuna.trial import TrialState


class IncumbentPruner(optuna.pruners.BasePruner):
    """Prune a trial whose running value exceeds the incumbent's at the same step by more than
    ``tolerance`` (relative) times sqrt(n_steps / (step + 1)); no pruning before
    ``warmup_steps`` steps or at the last step."""

    def __init__(self, tolerance: float = 0.02, *, n_steps: int = 4, warmup_steps: int = 1):
        if tolerance < 0 or n_steps < 1 or warmup_steps < 0:
            raise ValueError(
                f"need tolerance >= 0, n_steps >= 1, warmup_steps >= 0; got {tolerance}, {n_steps}, {warmup_steps}"
            )
        self.tolerance, self.n_steps, self.warmup_steps = tolerance, n_steps, warmup_steps

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.warmup_steps or step >= self.n_steps - 1:
            return False
        incumbent = _incumbent(study)
        if incumbent is None or step not in incumbent.intermediate_values:
            return False
        mine, theirs = trial.intermediate_values[step], incumbent.intermediate_values[step]
        if not math.isfinite(mine):
            return True
        margin = self.tolerance * math.sqrt(self.n_steps / (step + 1))
        return mine > theirs * (1.0 + margin)


def _incumbent(study: optuna.Study):
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return min(complete, key=lambda t: t.value) if complete else None
