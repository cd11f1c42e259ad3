"""Samplers by name, a user's own sampler class, and what each needs to know.

Any ``optuna.samplers.BaseSampler`` instance plugs in as it is. Names: ``refine`` (the
default: the knapsack plan, then moves scored by Fisher costs corrected with measured
losses; ``plan_samplers``), ``knapsack`` (the one-shot integer program over Fisher scores),
``random`` (the paper's method), ``tpe``, ``cmaes``, ``gp``, ``qmc``, ``nsga2``
(multi-objective: loss against ratio, one study gives the Pareto front), and
``sensitivity`` (TPE whose first trials are seeded from the sensitivity ranking). From the
command line, ``package.module:Class`` with JSON keyword arguments names a user's class.
"""

from __future__ import annotations

import importlib
import warnings

import optuna

from .plan_samplers import KnapsackSampler, RefineSampler

SAMPLER_NAMES = ("refine", "knapsack", "sensitivity", "random", "tpe", "cmaes", "gp", "qmc", "nsga2")
MULTI_OBJECTIVE = ("nsga2",)


def make_sampler(sampler, *, seed: int, kwargs: dict | None = None) -> optuna.samplers.BaseSampler:
    """An Optuna sampler from a name, a "module:Class" path, or an instance (returned as is)."""
    kwargs = dict(kwargs or {})
    if isinstance(sampler, optuna.samplers.BaseSampler):
        if kwargs:
            raise ValueError("sampler_kwargs only apply to a sampler given by name or 'module:Class'")
        return sampler
    if not isinstance(sampler, str):
        raise TypeError(
            f"sampler is a name ({', '.join(SAMPLER_NAMES)}), 'module:Class' or an optuna BaseSampler, "
            f"got {type(sampler).__name__}"
        )
    if ":" in sampler:
        return _import_sampler(sampler, seed, kwargs)
    s = optuna.samplers
    if sampler == "refine":
        return RefineSampler(seed=seed, **kwargs)
    if sampler == "knapsack":
        return KnapsackSampler(seed=seed, **kwargs)
    if sampler in ("tpe", "sensitivity"):
        kwargs.setdefault("multivariate", True)
        return s.TPESampler(seed=seed, **kwargs)
    if sampler == "random":
        return s.RandomSampler(seed=seed, **kwargs)
    if sampler == "cmaes":
        return s.CmaEsSampler(seed=seed, **kwargs)
    if sampler == "gp":
        return s.GPSampler(seed=seed, **kwargs)
    if sampler == "qmc":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return s.QMCSampler(seed=seed, **kwargs)
    if sampler == "nsga2":
        kwargs.setdefault("population_size", 10)
        return s.NSGAIISampler(seed=seed, **kwargs)
    raise ValueError(
        f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLER_NAMES)}, "
        "'package.module:Class', or an optuna.samplers.BaseSampler instance"
    )


def _import_sampler(path: str, seed: int, kwargs: dict) -> optuna.samplers.BaseSampler:
    module_name, _, class_name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import sampler {path!r}: {e}") from e
    try:
        sampler = cls(seed=seed, **kwargs)
    except TypeError:
        sampler = cls(**kwargs)  # a class without a seed argument
    if not isinstance(sampler, optuna.samplers.BaseSampler):
        raise TypeError(f"{path} made a {type(sampler).__name__}, not an optuna.samplers.BaseSampler")
    return sampler


def sampler_label(sampler) -> str:
    return sampler if isinstance(sampler, str) else f"{type(sampler).__module__}:{type(sampler).__name__}"
