"""Precision search: an Optuna study over plans under a quantization-ratio (or bits) budget.

    result = mpqc.search.run(graph, tokens, ratio=0.9, granularity="matmul", low="mxint4",
                             high="bf16", sampler="tpe", n_trials=50, storage="search.db")
    result.plan, result.perplexity, result.study

``objective=LMEvalObjective(task=..., tokenizer=...)`` scores plans by an lm-eval-harness task.
"""

from .budget import BUDGET_KINDS, Budget, SearchSpace, decode
from .samplers import SAMPLER_NAMES, make_sampler
from .lm_eval_adapter import LMEvalObjective, evaluate_task  # importable without lm_eval installed
from .sensitivity import priorities_from_sensitivity, sensitivity
from .study import PAPER_SETTING, SearchResult, run, write_outputs

__all__ = [
    "BUDGET_KINDS", "Budget", "LMEvalObjective", "PAPER_SETTING", "SAMPLER_NAMES", "SearchResult", "SearchSpace", "decode",
    "evaluate_task", "make_sampler", "priorities_from_sensitivity", "run", "sensitivity", "write_outputs",
]
