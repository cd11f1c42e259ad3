"""What a search spends, in full evaluations of its ``n_samples`` windows, and the cap on it.

``search_cost`` counts a study's spending: completed trials, pruned trials' partial
evaluations, the Fisher passes, the all-high plan's evaluation and the re-scoring.
``CostCap`` stops a search before a trial that could take it past ``max_cost``: it counts
that trial at a full evaluation, the re-scoring at the contenders it could leave and the
baselines' Fisher pass if it is still to come, so a search that keeps to the cap before
those still keeps to it after.
"""

from __future__ import annotations

import optuna

from .decide import rescored

COMPLETE, PRUNED, RUNNING = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.RUNNING,
)


def search_cost(study: optuna.Study, config, decided: dict | None) -> dict:
    """What the study's search cost, in full evaluations of its ``n_samples`` windows: completed
    trials, pruned trials' partial evaluations, the Fisher pass (a forward and a backward per
    window, counted as three forwards), the all-high plan's evaluation, and the re-scoring."""
    n = config.n_samples
    trials = pruned = 0.0
    for t in study.get_trials(deepcopy=False):
        windows = t.user_attrs.get("windows")
        if t.state == COMPLETE:
            trials += (n if windows is None else windows) / n  # a repeat of a measured plan: 0 windows
        elif t.state == PRUNED:
            pruned += (windows or 0) / n
    cost = {
        "trials": trials,
        "pruned": pruned,
        "sensitivity": fisher_pass_cost(config) * _fisher_passes(study),
        "base": 1.0 if study.user_attrs.get("base_perplexity") is not None else 0.0,
        "rescore": 0.0 if decided is None else len(decided["contenders"]) * decided["extra_windows"] / n,
    }
    cost["total"] = sum(cost.values())
    return cost


def fisher_pass_cost(config) -> float:
    """One Fisher pass, a forward and a backward per window, counted as three forwards."""
    return 3 * config.sensitivity_windows / config.n_samples


def _fisher_passes(study: optuna.Study) -> int:
    """How many Fisher passes the study made: at the all-high plan, and at the all-low plan."""
    return sum(study.user_attrs.get(key) is not None for key in ("sensitivity", "sensitivity_low"))


class CostCap:
    """Whether another trial fits under ``max_cost`` full evaluations (None: no cap).

    ``rescore``: the re-scoring's ``k`` (0 or 1: none), ``anchors``: the plans it also scores
    (each contender on ``config.extra_windows`` windows). Trials other workers are
    running count at a full evaluation each; two workers deciding at the same moment can still
    both start one.
    """

    def __init__(self, max_cost: float | None, config, *, rescore: int, anchors=(), baselines: bool = False):
        self.max_cost, self.config, self.k, self.anchors = max_cost, config, rescore, list(anchors)
        self.baselines = baselines  # the knapsack baseline needs the Fisher pass, if the search made none
        self.stopped = False

    def room(self, study: optuna.Study) -> bool:
        """Whether a trial started now, measured in full, keeps the search within the cap."""
        if self.max_cost is None:
            return True
        running = len(study.get_trials(deepcopy=False, states=(RUNNING,)))
        spent = search_cost(study, self.config, None)["total"] + running
        self.stopped = spent + 1.0 + self._still_to_spend(study) > self.max_cost
        return not self.stopped

    def _still_to_spend(self, study: optuna.Study) -> float:
        """After one more trial: the re-scoring, and the baselines' Fisher pass where it is still to come."""
        rescore = self._rescore_after_one_more(study) * self.config.extra_windows / self.config.n_samples
        fisher = self.baselines and study.user_attrs.get("sensitivity") is None
        return rescore + (fisher_pass_cost(self.config) if fisher else 0.0)

    def _rescore_after_one_more(self, study: optuna.Study) -> int:
        """How many contenders the re-scoring could score if one more trial completes."""
        if self.k <= 1:
            return 0
        contenders = min(len(rescored(study, self.k, self.anchors)) + 1, self.k + len(self.anchors))
        return contenders if contenders >= 2 else 0

    def check(self, study: optuna.Study) -> None:
        """Refuse a cap that left no completed trial to name (the Fisher pass and the all-high
        plan are spent before the first trial)."""
        if self.stopped and not study.get_trials(deepcopy=False, states=(COMPLETE,)):
            spent = search_cost(study, self.config, None)["total"]
            raise ValueError(
                f"max_cost={self.max_cost:g} full evaluations leaves no room for a trial: {spent:.1f} were "
                f"spent before the first, and a trial with what follows it needs up to "
                f"{1 + self._still_to_spend(study):.1f} more; raise max_cost or leave it None"
            )

    def note(self) -> list[str]:
        if not self.stopped:
            return []
        return [
            f"stopped before n_trials: another trial could take the search past max_cost={self.max_cost:g} full evaluations"
        ]
