"""mpqc.search.run: an Optuna study over plans under a budget, on one compiled model.

Each trial decodes the sampler's priorities into a plan that meets the budget, switches the
one compiled model to it and scores it (``trials.TrialRunner``): perplexity on windows
sampled once, or with ``objective=LMEvalObjective(...)`` an lm-eval-harness task's metric
(``mpqc.search.lm_eval_adapter``). The settings are one ``SearchConfig``; the study and its
stored settings are opened by ``storage``; the result and its files come from ``results``.
"""

from __future__ import annotations

import json
import warnings

import optuna
import torch
from tqdm.auto import tqdm

from mpqc.compile import QuantizedModel, compile
from mpqc.evaluate import sample_windows
from mpqc.graph import Graph

from .budget import SearchSpace, low_precision
from .config import SearchConfig
from .objective import WindowPerplexity, check_objective
from .results import SearchResult, best_result
from .samplers import MULTI_OBJECTIVE, make_sampler
from .sensitivity import seed_study
from .storage import check_settings, open_study
from .trials import TrialRunner


def run(
    graph: Graph,
    tokens: torch.Tensor,
    config: SearchConfig | None = None,
    *,
    objective=None,
    qmodel: QuantizedModel | None = None,
    progress: bool = True,
    **settings,
) -> SearchResult:
    """Find the plan with the lowest perplexity on ``tokens`` (or the best ``objective``) under the budget.

    ``config``: a ``SearchConfig``; or its settings as keywords (``ratio=`` or ``budget=``,
    ``low``, ``high``, ``sampler``, ``n_trials``, ``seq_len``, ``n_samples``, ``storage`` ...:
    see ``SearchConfig``). ``objective``: None (perplexity on ``n_samples`` windows of
    ``seq_len`` tokens) or an ``Objective`` (``config() -> dict``, which joins the stored
    study's settings; ``evaluate(qmodel)`` returning a score with ``.loss``, ``.value``,
    ``.metric``), e.g. ``LMEvalObjective(task="mmlu", tokenizer=tok, limit=100)``; each trial
    then also records the window perplexity. ``qmodel``: a compiled model of ``graph`` to reuse.

    With ``torch_compile`` the low and high formats are declared up front, so the whole search
    is one compile (plus one per new batch shape), and the best plan is evaluated once more
    eagerly (``result.eager_perplexity``), the reference number.
    """
    config = _resolve_config(config, settings)
    low_p, high_p = low_precision(config.low, config.high, weights_only=config.weights_only)
    space = SearchSpace(
        graph,
        config.granularity,
        low_p,
        high_p,
        config.budget,
        config.block_size,
        config.rounding,
        config.target,
        config.keep_high,
    )
    multi = config.sampler in MULTI_OBJECTIVE
    sampler = make_sampler(config.sampler, seed=config.effective_sampler_seed, kwargs=config.sampler_kwargs)
    _check_reachable(space)
    windows = sample_windows(tokens, config.seq_len, config.n_samples, config.seed, config.prefix)
    stored = config.study_settings(graph, space.plan([]).granularity_label, str(low_p), str(high_p), multi)
    if objective is not None:
        check_objective(objective)
        # Only a non-default objective adds the key: studies stored before it existed still resume.
        stored["objective"] = json.loads(json.dumps(objective.config()))
    study = open_study(
        config.storage, config.default_study_name(stored), sampler, multi=multi, heartbeat=config.heartbeat
    )
    check_settings(study, stored)
    qmodel = _compiled(graph, space, qmodel)
    perplexity = WindowPerplexity(windows, config.batch_size, forward=_forward(qmodel, config, low_p, high_p))
    runner = TrialRunner(qmodel, space, perplexity, objective=objective, multi=multi)
    if config.sampler == "sensitivity":
        seed_study(
            study,
            qmodel,
            space,
            tokens,
            seq_len=config.seq_len,
            n_windows=config.sensitivity_windows,
            n_seeded=config.n_seeded,
            seed=config.seed,
            prefix=config.prefix,
            progress=progress,
        )
    _optimize(study, runner, config.n_trials, multi=multi, progress=progress)
    result = best_result(study, space, config.budget, multi=multi, objective=stored.get("objective"))
    if config.torch_compile:
        result.eager_perplexity = runner.evaluate_perplexity(result.plan, eager=True)
    return result


def _resolve_config(config: SearchConfig | None, settings: dict) -> SearchConfig:
    if config is None:
        return SearchConfig.from_keywords(**settings)
    if not isinstance(config, SearchConfig):
        raise TypeError(f"config must be a SearchConfig, got {type(config).__name__}")
    return config.replace(**settings) if settings else config


def _check_reachable(space: SearchSpace) -> None:
    budget = space.budget
    lo, hi = space.reachable()
    if budget.kind != "bits" and budget.value > hi + 1e-12:
        raise ValueError(f"{budget} is unreachable: with everything {space.low} the ratio is {hi:.4f}")
    if budget.kind == "bits" and budget.value < lo - 1e-12:
        raise ValueError(f"{budget} is unreachable: with everything {space.low} the average is {lo:.4f} bits")


def _compiled(graph: Graph, space: SearchSpace, qmodel: QuantizedModel | None) -> QuantizedModel:
    qmodel = qmodel or compile(graph, space.plan([]))
    if qmodel.graph is not graph:
        raise ValueError("qmodel was compiled from another graph")
    return qmodel


def _forward(qmodel: QuantizedModel, config: SearchConfig, low_p, high_p):
    """The module trials run through: torch.compile'd (the formats declared first) or None (eager)."""
    if not config.torch_compile:
        return None
    qmodel.add_activation_formats([low_p.activation, high_p.activation])
    if config.torch_compile is True:
        return qmodel.torch_compile()
    return qmodel.torch_compile(backend=config.torch_compile)


def _n_complete(study: optuna.Study) -> int:
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


def _optimize(study: optuna.Study, runner: TrialRunner, n_trials: int, *, multi: bool, progress: bool) -> None:
    """Run trials until the study holds ``n_trials`` completed ones (earlier runs' count too)."""
    bar = tqdm(
        total=n_trials, initial=min(_n_complete(study), n_trials), desc="search", unit="trial", disable=not progress
    )

    def on_trial(study_, trial_):
        bar.n = min(_n_complete(study_), n_trials)
        if not multi and any(t.state == optuna.trial.TrialState.COMPLETE for t in study_.trials):
            best_trial = study_.best_trial  # with an objective, its raw metric rather than the loss
            bar.set_postfix(best=f"{best_trial.user_attrs.get('metric', best_trial.value):.3f}")
        bar.refresh()

    stop = optuna.study.MaxTrialsCallback(n_trials, states=(optuna.trial.TrialState.COMPLETE,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        while _n_complete(study) < n_trials:
            study.optimize(runner, n_trials=n_trials - _n_complete(study), callbacks=[on_trial, stop])
    bar.close()
