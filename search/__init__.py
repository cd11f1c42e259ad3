"""Precision search: an Optuna study over plans under a quantization-ratio (or bits) budget.

    result = mpqc.search.run(graph, tokens, ratio=0.9, granularity="matmul", low="mxint4",
                             high="bf16", sampler="tpe", n_trials=50, storage="search.db")
    result.plan, result.perplexity, result.study

    config = mpqc.search.SearchConfig(budget=("params", 0.9), sampler="random", n_trials=50)
    result = mpqc.search.run(graph, tokens, config)

``objective=LMEvalObjective(task=..., tokenizer=...)`` scores plans by an lm-eval-harness task.

Modules: ``config`` (SearchConfig), ``budget`` (budgets, the search space, the priority
encoding), ``samplers``, ``sensitivity`` (the Fisher estimate and the seeded first trials),
``objective`` (the objective protocol, window perplexity), ``trials`` (one trial),
``storage`` (opening a study, its stored settings), ``identity`` (what a stored study's numbers
depend on), ``workers`` (several workers on one study: seeds, distinct trials, claims),
``results`` (the result and its files), ``cost`` (what a search spends, the cap on it),
``study`` (``run``: the orchestration), ``lm_eval_adapter`` (the lm-eval objective).
"""

from .budget import BUDGET_KINDS, Budget, SearchSpace, decode
from .config import PAPER_SETTING, SearchConfig
from .lm_eval_adapter import LMEvalObjective, evaluate_task  # importable without lm_eval installed
from .objective import Objective, Score, WindowPerplexity
from .results import SearchResult, write_outputs
from .samplers import SAMPLER_NAMES, make_sampler
from .sensitivity import priorities_from_sensitivity, sensitivity
from .study import run

__all__ = [
    "BUDGET_KINDS",
    "Budget",
    "LMEvalObjective",
    "Objective",
    "PAPER_SETTING",
    "SAMPLER_NAMES",
    "Score",
    "SearchConfig",
    "SearchResult",
    "SearchSpace",
    "WindowPerplexity",
    "decode",
    "evaluate_task",
    "make_sampler",
    "priorities_from_sensitivity",
    "run",
    "sensitivity",
    "write_outputs",
]
