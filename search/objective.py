"""What a search minimizes: the objective protocol, and perplexity on sampled windows.

An objective scores the one compiled model as it is (after ``set_plan``; no recapture):

    class Objective(Protocol):
        def config(self) -> dict | None: ...        # JSON-ready; joins the stored study's settings
        def evaluate(self, qmodel) -> Score: ...     # .loss (minimized), .value, .metric

``WindowPerplexity`` (the default) is perplexity on windows sampled once;
``mpqc.search.lm_eval_adapter.LMEvalObjective`` scores an lm-eval-harness task.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol, runtime_checkable

import torch

from mpqc.evaluate import EXP_LIMIT, nll, running_nll


@runtime_checkable
class Score(Protocol):
    @property
    def loss(self) -> float: ...  # what the study minimizes

    @property
    def value(self) -> float: ...  # the raw metric (e.g. accuracy, or perplexity)

    @property
    def metric(self) -> str: ...  # the metric's name


@runtime_checkable
class Objective(Protocol):
    def config(self) -> dict | None: ...

    def evaluate(self, qmodel) -> Score: ...


def check_objective(objective) -> None:
    """A clear error for an object that does not implement the protocol."""
    for attr in ("config", "evaluate"):
        if not callable(getattr(objective, attr, None)):
            raise TypeError(
                f"objective must have config() and evaluate(qmodel) (e.g. LMEvalObjective); "
                f"{type(objective).__name__} has no {attr}()"
            )


def perplexity_of(mean_nll: float) -> float:
    """exp(mean NLL), or inf where it overflows or is not finite (a diverged plan)."""
    value = math.exp(mean_nll) if mean_nll <= EXP_LIMIT else math.inf
    return value if math.isfinite(value) else math.inf


@dataclasses.dataclass(frozen=True)
class PerplexityScore:
    value: float
    metric: str = "perplexity"
    higher_is_better: bool = False

    @property
    def loss(self) -> float:
        return self.value


@dataclasses.dataclass
class WindowPerplexity:
    """Perplexity on fixed windows [n, seq_len]; ``forward`` overrides the module that runs them
    (a torch.compile'd one), while plans are still switched on the compiled model itself."""

    windows: torch.Tensor
    batch_size: int = 8
    forward: object = None

    def config(self) -> None:
        return None  # the windows' settings are in the study's own settings already

    def running(self, qmodel, steps: int):
        """Perplexity over the windows so far, after each of ``steps`` chunks; the last is ``evaluate``'s."""
        run = qmodel if self.forward is None else self.forward
        for mean in running_nll(run, self.windows, batch_size=self.batch_size, steps=steps):
            yield perplexity_of(mean)

    def evaluate(self, qmodel) -> PerplexityScore:
        run = qmodel if self.forward is None else self.forward
        return PerplexityScore(
            perplexity_of(nll(run, windows=self.windows, batch_size=self.batch_size, progress=False))
        )
