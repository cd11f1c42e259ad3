"""SearchConfig: the one place a search's settings are named, validated and fingerprinted.

The CLI, sweeps and the predictor's data collection build one of these instead of repeating
the search's keywords; ``mpqc.search.run(graph, tokens, ratio=0.9, ...)`` builds it from its
keywords. ``study_settings`` is what a stored study remembers, so that a study made with other
settings is refused rather than mixed.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from mpqc.graph import Graph

from .budget import Budget

# The paper's setting (Cao et al. 2024): random search, 50 trials, 1024 sampled sequences.
PAPER_SETTING = {"sampler": "random", "n_trials": 50, "n_samples": 1024}


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Every setting of one search. ``budget``: a ``Budget`` or (kind, value); ``ratio`` in
    ``from_keywords`` is shorthand for ("params", ratio), the paper's Q_r.

    ``low``/``high``: the two precisions (``weights_only`` keeps activations at ``high``).
    ``sampler``: a name, "module:Class" or an Optuna sampler; ``sampler_seed`` (default
    ``seed``) seeds it apart from the evaluation windows. ``n_trials`` counts completed trials
    in the study, including earlier runs on the same storage. ``prefix``: token ids every
    window starts with (the tokenizer's BOS). ``torch_compile``: True or a torch.compile
    backend evaluates trials through one compile of the model. ``target="llama.cpp"`` scores
    every plan with the activations llama.cpp's CPU kernels compute with for each weight type
    (``mpqc.targets``); ``low`` and ``high`` must then have GGUF types (q4_0, q8_0, mxfp4 ...).
    ``keep_high``: components that stay at ``high`` and are not searched (a tied lm_head that
    should keep sharing the embedding's bytes in a GGUF file, say).
    """

    budget: Budget
    granularity: Any = "matmul"
    low: str = "mxint4"
    high: str = "bf16"
    weights_only: bool = False
    sampler: Any = "sensitivity"
    sampler_kwargs: dict | None = None
    n_trials: int = 50
    seq_len: int = 256
    n_samples: int = 32
    batch_size: int = 8
    seed: int = 0
    sampler_seed: int | None = None
    storage: Any = None
    study_name: str | None = None
    block_size: Any = None
    rounding: str = "nearest"
    n_seeded: int = 4
    sensitivity_windows: int = 4
    heartbeat: int = 10
    torch_compile: Any = False
    prefix: tuple[int, ...] = ()
    target: str | None = None
    keep_high: tuple[str, ...] = ()

    def __post_init__(self):
        budget = self.budget if isinstance(self.budget, Budget) else Budget(*self.budget)
        object.__setattr__(self, "budget", budget)  # normalized once, here
        object.__setattr__(self, "prefix", tuple(int(t) for t in self.prefix))
        object.__setattr__(self, "keep_high", tuple(str(c) for c in self.keep_high))
        if not isinstance(self.n_trials, int) or isinstance(self.n_trials, bool) or self.n_trials < 1:
            raise ValueError(f"n_trials must be a positive int, got {self.n_trials!r}")

    @classmethod
    def from_keywords(cls, *, ratio: float | None = None, budget=None, **settings) -> SearchConfig:
        """``ratio=`` (Q_r by parameters) or ``budget=`` (a Budget or (kind, value)), and the rest."""
        if (ratio is None) == (budget is None):
            raise ValueError("give exactly one of ratio= (Q_r by parameters) or budget= (a Budget or (kind, value))")
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(
                f"unknown search settings {unknown}; valid: {', '.join(f.name for f in dataclasses.fields(cls))}"
            )
        return cls(budget=Budget("params", ratio) if ratio is not None else budget, **settings)

    def replace(self, **changes) -> SearchConfig:
        return dataclasses.replace(self, **changes)

    @property
    def effective_sampler_seed(self) -> int:
        return self.seed if self.sampler_seed is None else self.sampler_seed

    def study_settings(self, graph: Graph, granularity_label: str, low: str, high: str, multi: bool) -> dict:
        """What a stored study remembers: a study made with other values is refused.

        Keys appear only off their old defaults, so studies stored before a key existed resume.
        """
        settings = {
            "graph": graph_fingerprint(graph),
            "budget": dataclasses.asdict(self.budget),
            "granularity": granularity_label,
            "low": low,
            "high": high,
            "block_size": self.block_size,
            "rounding": self.rounding,
            "seq_len": self.seq_len,
            "n_samples": self.n_samples,
            "seed": self.seed,
            "multi_objective": multi,
        }
        if self.prefix:
            settings["prefix"] = list(self.prefix)
        if self.target is not None:
            settings["target"] = self.target
        if self.keep_high:
            settings["keep_high"] = list(self.keep_high)
        return settings

    def default_study_name(self, settings: dict) -> str:
        name = f"mpqc-{settings['graph']}-{self.budget.kind}{self.budget.value:g}-{settings['granularity']}-{self.low}"
        objective = settings.get("objective")
        if objective is not None:
            name += f"-{objective.get('kind', 'objective')}-{objective.get('task', '')}"
        return self.study_name or name


def graph_fingerprint(graph: Graph) -> str:
    names = "\n".join(f"{m.name}:{m.params}" for m in graph.matmuls)
    return hashlib.sha256(f"{graph.model_class}\n{names}".encode()).hexdigest()[:16]
