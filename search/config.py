"""SearchConfig: the one place a search's settings are named, validated and fingerprinted.

The CLI, sweeps and the predictor's data collection build one of these instead of repeating
the search's keywords; ``mpqc.search.run(graph, tokens, ratio=0.9, ...)`` builds it from its
keywords. ``study_settings`` is what a stored study remembers, so that a study made with other
settings is refused rather than mixed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optuna

from mpqc import fingerprint
from mpqc.evaluate import sample_windows
from mpqc.graph import Graph
from mpqc.plan import keep_high_entries, q_r_definition

from . import identity
from .budget import Budget

# The paper's setting (Cao et al. 2024): random search, 50 trials, 1024 sampled sequences, every
# trial scored on all of them, every matmul a variable, the best trial taken as it is.
PAPER_SETTING = {
    "sampler": "random",
    "n_trials": 50,
    "n_samples": 1024,
    "pruner": None,
    "rescore": 0,
    "search_dominated": True,
}


# Each set of windows a search draws from its text has a seed of its own (``seed`` plus this),
# so the Fisher pass and the re-scoring never see the trials' windows.
WINDOW_SEED_OFFSETS = {"search": 0, "fisher": 1, "fresh": 2}


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Every setting of one search. ``budget``: a ``Budget`` or (kind, value); ``ratio`` in
    ``from_keywords`` is shorthand for ("params", ratio), the paper's Q_r.

    ``low``/``high``: the two precisions (``weights_only`` keeps activations at ``high``), each a
    format name or a preference list ("q4_k,q5_0" or a sequence): a component takes the first
    format that stores its weights' rows, so llama.cpp's k-quants can be searched where the
    shapes allow them and their fallback elsewhere, as llama-quantize does.
    ``sampler``: a name, "module:Class" or an Optuna sampler; ``sampler_seed`` (default
    ``seed``) seeds it apart from the evaluation windows. ``n_trials`` counts measured trials
    (completed, or pruned part way) in the study, including earlier runs on the same storage.
    ``prefix``: token ids every window starts with (the tokenizer's BOS). ``torch_compile``: True or a torch.compile
    backend evaluates trials through one compile of the model.

    ``search_dominated``: also search components that cannot pay for the budget (no weights
    under a parameter or bits budget) or that the low precision would not narrow; by default
    they stay high. ``pruner``: "incumbent" (``IncumbentPruner``: trials report their running
    perplexity on ``prune_steps`` chunks of the windows and stop once they cannot win), None,
    or an Optuna pruner. ``rescore``: before the best plan is named, the best ``rescore``
    distinct plans (with a plan sampler, also the one-shot plans it started from) are scored again on
    ``rescore_windows`` fresh windows of the search text (default twice ``n_samples``; the
    same windows for each) and the one best on those wins; 0 takes the best trial as it is.
    ``rescore_confidence``: with a plan sampler's start plans, another contender replaces the
    first of them only if its per-window NLL on the fresh windows is lower by a paired
    one-sided interval at this confidence (e.g. 0.95); None (the default) lets the least
    perplexity win.
    ``max_cost``: the most full evaluations of the ``n_samples`` windows the search may spend,
    the Fisher passes, pruned trials and re-scoring included (``result.cost``); the search stops
    before ``n_trials`` rather than start a trial that could pass it. None: no cap.
    ``baselines``: also name the plans a result is judged against (all high, all low, the
    knapsack plan at the same budget; the last needs the Fisher pass, which the default
    strategy makes anyway).
    ``target="llama.cpp"`` scores every plan with the activations llama.cpp's CPU kernels compute
    with for each weight type (``mpqc.targets``); ``low`` and ``high`` must then have GGUF types
    (q4_0, q8_0, mxfp4 ...).
    ``keep_high``: components (names, or roles such as "lm_head") that stay at ``high``, are not
    searched and are left out of Q_r, numerator and denominator: a ratio budget is then the
    share of the searchable matmuls' parameters (the paper's Q_r with the lm_head kept high;
    a tied lm_head that should keep sharing the embedding's bytes in a GGUF file, say). The
    result's ``q_r_definition`` says which parameters Q_r counted.
    """

    budget: Budget
    granularity: Any = "matmul"
    low: str = "mxint4"
    high: str = "bf16"
    weights_only: bool = False
    sampler: Any = "refine"
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
    search_dominated: bool = False
    pruner: Any = "incumbent"
    prune_steps: int = 4
    rescore: int = 3
    rescore_windows: int | None = None
    rescore_confidence: float | None = None
    max_cost: float | None = None
    baselines: bool = True
    target: str | None = None
    keep_high: tuple[str, ...] = ()

    def __post_init__(self):
        budget = self.budget if isinstance(self.budget, Budget) else Budget(*self.budget)
        object.__setattr__(self, "budget", budget)  # normalized once, here
        object.__setattr__(self, "prefix", tuple(int(t) for t in self.prefix))
        object.__setattr__(self, "keep_high", keep_high_entries(self.keep_high))
        for name in ("low", "high"):  # a preference list is stored as the CLI spells it
            if not isinstance(getattr(self, name), str):
                object.__setattr__(self, name, ",".join(getattr(self, name)))
        for name in ("n_trials", "prune_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.pruner not in (None, "incumbent") and not isinstance(self.pruner, optuna.pruners.BasePruner):
            raise ValueError(f"pruner is 'incumbent', None or an optuna pruner, got {self.pruner!r}")
        if not isinstance(self.rescore, int) or self.rescore < 0:
            raise ValueError(f"rescore must be an int >= 0 (0: no re-scoring), got {self.rescore!r}")
        c = self.rescore_confidence
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.5 <= c < 1):
            raise ValueError(f"rescore_confidence must be in [0.5, 1) or None (least perplexity wins), got {c!r}")
        m = self.max_cost
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0):
            raise ValueError(f"max_cost must be a number of full evaluations > 0, or None (no cap); got {m!r}")
        _seed_from_sampler_kwargs(self)

    @property
    def extra_windows(self) -> int:
        """Windows the re-scoring adds to the search windows."""
        return self.rescore_windows if self.rescore_windows is not None else 2 * self.n_samples

    def windows(self, tokens, role: str):
        """The windows of ``tokens`` the search draws for ``role``: "search" (``n_samples``, every
        trial's), "fisher" (``sensitivity_windows``, the Fisher pass's) or "fresh"
        (``extra_windows``, the re-scoring's), each ``seq_len`` tokens after ``prefix``."""
        count = {"search": self.n_samples, "fisher": self.sensitivity_windows, "fresh": self.extra_windows}
        if role not in count:
            raise ValueError(f"windows are drawn for {', '.join(count)}; got {role!r}")
        return sample_windows(tokens, self.seq_len, count[role], self.seed + WINDOW_SEED_OFFSETS[role], self.prefix)

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
        if self.search_dominated:  # only then: studies stored before the switch existed resume
            settings["search_dominated"] = True
        if self.target is not None:
            settings["target"] = self.target
        if self.keep_high:
            settings["keep_high"] = list(self.keep_high)
            # Studies made before kept-high components left Q_r recorded Q_r over all matmuls.
            settings["q_r_definition"] = q_r_definition(self.keep_high)
        return settings

    def default_study_name(self, settings: dict) -> str:
        # The digest covers the whole identity (weights, text, dtype ...: search/identity.py).
        name = f"mpqc-{identity.digest(settings)}-{self.budget.kind}{self.budget.value:g}-{settings['granularity']}-{self.low}"
        objective = settings.get("objective")
        if objective is not None:
            name += f"-{objective.get('kind', 'objective')}-{objective.get('task', '')}"
        return self.study_name or name


def graph_fingerprint(graph: Graph) -> str:
    return fingerprint.structure(graph)  # the model class and every matmul's name and size


def _seed_from_sampler_kwargs(config: SearchConfig) -> None:
    """``sampler_kwargs={"seed": 7}`` is the sampler's seed: it becomes ``sampler_seed``."""
    kwargs = config.sampler_kwargs
    if not isinstance(kwargs, dict) or "seed" not in kwargs:
        return
    if config.sampler_seed is not None and config.sampler_seed != kwargs["seed"]:
        raise ValueError(
            f"two sampler seeds: sampler_seed={config.sampler_seed} and sampler_kwargs seed={kwargs['seed']}"
        )
    object.__setattr__(config, "sampler_seed", kwargs["seed"])
    object.__setattr__(config, "sampler_kwargs", {k: v for k, v in kwargs.items() if k != "seed"} or None)
