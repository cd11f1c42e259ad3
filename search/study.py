"""mpqc.search.run: an Optuna study over plans under a budget, on one compiled model.

Each trial decodes the sampler's priorities into a plan that meets the budget, switches the
one compiled model to it and scores it (``trials.TrialRunner``): perplexity on windows
sampled once, or with ``objective=LMEvalObjective(...)`` an lm-eval-harness task's metric
(``mpqc.search.lm_eval_adapter``). The settings are one ``SearchConfig``; the study and its
stored settings are opened by ``storage``; the result and its files come from ``results``.
"""

from __future__ import annotations

import json
import math
import warnings

import optuna
import torch
from optuna.pruners import NopPruner
from tqdm.auto import tqdm

from mpqc.compile import QuantizedModel, compile
from mpqc.graph import Graph

from .budget import SearchSpace, search_precisions
from .config import SearchConfig
from .cost import CostCap, search_cost
from .decide import rescore
from .identity import measured
from .knapsack import solve_knapsack
from .objective import WindowPerplexity, check_objective
from .plan_samplers import PlanContext, PlanSampler
from .pruning import IncumbentPruner
from .results import SearchResult, best_result
from .samplers import MULTI_OBJECTIVE, make_sampler
from .sensitivity import seed_study, study_sensitivity
from .storage import check_settings, open_study
from .trials import TrialRunner
from .workers import TrialGate, n_measured, orphan_seconds, worker_number, worker_sampler


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
    low_p, high_p = search_precisions(config.low, config.high, weights_only=config.weights_only)
    space = SearchSpace(
        graph,
        config.granularity,
        low_p,
        high_p,
        config.budget,
        config.block_size,
        config.rounding,
        search_dominated=config.search_dominated,
        runtime=config.target,
        keep_high=config.keep_high,
    )
    multi = config.sampler in MULTI_OBJECTIVE
    sampler = make_sampler(config.sampler, seed=config.effective_sampler_seed, kwargs=config.sampler_kwargs)
    _check_reachable(space)
    windows = config.windows(tokens, "search")
    stored = config.study_settings(graph, space.plan([]).granularity_label, space.low_label, space.high_label, multi)
    stored.update(measured(graph, tokens))  # the weights, text, dtype and device the numbers depend on
    if objective is not None:
        check_objective(objective)
        # Only a non-default objective adds the key: studies stored before it existed still resume.
        stored["objective"] = json.loads(json.dumps(objective.config()))
    pruning = config.pruner is not None and objective is None and not multi
    steps, batch_size = _chunks(config, len(windows), pruning=pruning)
    study = open_study(
        config.storage,
        config.default_study_name(stored),
        sampler,
        multi=multi,
        heartbeat=config.heartbeat,
        pruner=make_pruner(config, steps) if steps > 1 else NopPruner(),
    )
    check_settings(study, stored)
    worker = worker_number(study, stored=config.storage is not None)  # a restart or a second machine: 1, 2, ...
    sampler = study.sampler = worker_sampler(sampler, config, worker)
    qmodel = _compiled(graph, space, qmodel)
    perplexity = WindowPerplexity(windows, batch_size, forward=_forward(qmodel, config, low_p, high_p))
    runner = TrialRunner(
        qmodel,
        space,
        perplexity,
        objective=objective,
        multi=multi,
        plan_sampler=isinstance(sampler, PlanSampler),
        steps=steps,
    )
    runner.gate = TrialGate(config.n_trials, orphan_after=orphan_seconds(config.heartbeat))  # no surplus, no repeat
    _prepare_sampler(sampler, study, runner, tokens, config, progress, seeds=worker == 0)
    cap = _cost_cap(study, config, rescoring=_rescores(runner, multi), baselines=config.baselines and not multi)
    _optimize(study, runner, config.n_trials, cap, multi=multi, progress=progress)
    cap.check(study)
    return _result(study, runner, tokens, config, stored, multi=multi, progress=progress, cap=cap)


def _rescores(runner: TrialRunner, multi: bool) -> bool:
    """Whether the search re-scores its best plans (perplexity searches of one objective)."""
    return runner.objective is None and not multi


def _start_plans(study) -> list:
    return study.sampler.start_plans() if isinstance(study.sampler, PlanSampler) else []


def _cost_cap(study, config: SearchConfig, *, rescoring: bool, baselines: bool) -> CostCap:
    k = config.rescore if rescoring else 0
    anchors = _start_plans(study) if k > 1 else ()
    return CostCap(config.max_cost, config, rescore=k, anchors=anchors, baselines=baselines)


def _result(study, runner: TrialRunner, tokens, config: SearchConfig, stored: dict, *, multi, progress, cap):
    """Name the best plan (after re-scoring the best few), with its baselines and cost."""
    best, decided = None, None
    if config.rescore > 1 and _rescores(runner, multi):
        extra = config.windows(tokens, "fresh")
        best, decided = rescore(
            study, runner, extra, config.rescore, anchors=_start_plans(study), confidence=config.rescore_confidence
        )
    result = best_result(study, runner.space, config.budget, multi=multi, objective=stored.get("objective"), best=best)
    result.notes.extend(runner.gate.notes() + cap.note())
    result.decided = decided
    if config.baselines and not multi:
        result.baselines = _baselines(study, runner, tokens, config, progress)
    result.cost = search_cost(study, config, decided)
    if config.torch_compile:
        result.eager_perplexity = runner.evaluate_perplexity(result.plan, eager=True)
    return result


def _baselines(study, runner: TrialRunner, tokens, config: SearchConfig, progress: bool) -> dict:
    """All high, all low, and the knapsack optimum of the Fisher scores at the same budget."""
    space = runner.space
    sens = _fisher(study, runner, tokens, config, progress)
    knapsack = solve_knapsack({n: sens[n] for n in runner.names}, runner.sizes, runner.target)
    return {
        "all_high": space.plan([]),
        "all_low": space.plan(runner.names),
        "knapsack": space.plan(knapsack if knapsack is not None else runner.names),
    }


def _fisher(study, runner: TrialRunner, tokens, config: SearchConfig, progress: bool, *, at_low: bool = False):
    """The study's Fisher scores of every component (at the all-low plan with ``at_low``)."""
    windows = config.windows(tokens, "fisher")
    return study_sensitivity(study, runner.qmodel, runner.space, windows, at_low=at_low, progress=progress)


def _chunks(config: SearchConfig, n_windows: int, *, pruning: bool) -> tuple[int, int]:
    """(chunks each trial reports, windows per batch). A pruned search reports up to ``prune_steps``
    times; batches shrink to the chunk size where there are fewer batches than chunks (8
    windows in batches of 8 would give the pruner nothing to act on). Every evaluation of the
    search uses these batches, so its numbers agree with each other to the bit."""
    if not pruning:
        return 1, config.batch_size
    batch = min(config.batch_size, -(-n_windows // min(config.prune_steps, n_windows)))
    return min(config.prune_steps, -(-n_windows // batch)), batch  # running_nll's own count


def make_pruner(config: SearchConfig, steps: int) -> optuna.pruners.BasePruner:
    if isinstance(config.pruner, optuna.pruners.BasePruner):
        return config.pruner
    if config.pruner == "incumbent":
        return IncumbentPruner(n_steps=steps)
    raise ValueError(f"pruner is 'incumbent', None or an optuna pruner, got {config.pruner!r}")


def _prepare_sampler(
    sampler, study, runner: TrialRunner, tokens, config: SearchConfig, progress: bool, *, seeds: bool = True
) -> None:
    """Give mpqc's samplers what they start from: the Fisher scores (once per study; at the
    all-low plan too for samplers that use them), and for plan samplers the all-high plan's
    loss on the search windows. ``seeds``: this worker may
    enqueue the sensitivity sampler's seeded trials (worker 0 of a study does)."""
    if config.sampler != "sensitivity" and not isinstance(sampler, PlanSampler):
        return
    sens = _fisher(study, runner, tokens, config, progress)
    if config.sampler == "sensitivity":
        if seeds:
            seed_study(study, runner.space, sens, n_seeded=config.n_seeded, seed=config.seed)
        return
    base = study.user_attrs.get("base_perplexity")
    if base is None:
        base = runner.evaluate_perplexity(runner.space.plan([]))
        study.set_user_attr("base_perplexity", base)
    low = None
    if sampler.uses_low_scores:
        low = _fisher(study, runner, tokens, config, progress, at_low=True)
    layers = {c.name: c.layer for c in runner.space.variables()}
    sampler.prepare(
        PlanContext(
            names=tuple(runner.names),
            sizes=runner.sizes,
            target=runner.target,
            scores={n: sens[n] for n in runner.names},
            layers=layers,
            base_loss=math.log(base) if 0 < base < math.inf else None,
            scores_low=None if low is None else {n: low[n] for n in runner.names},
        )
    )


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
        raise ValueError(f"{budget} is unreachable: with everything {space.low_label} the ratio is {hi:.4f}")
    if budget.kind == "bits" and budget.value < lo - 1e-12:
        raise ValueError(f"{budget} is unreachable: with everything {space.low_label} the average is {lo:.4f} bits")


def _compiled(graph: Graph, space: SearchSpace, qmodel: QuantizedModel | None) -> QuantizedModel:
    qmodel = qmodel or compile(graph, space.plan([]))
    if qmodel.graph is not graph:
        raise ValueError("qmodel was compiled from another graph")
    return qmodel


def _forward(qmodel: QuantizedModel, config: SearchConfig, low_p, high_p):
    """The module trials run through: torch.compile'd (the formats declared first) or None (eager)."""
    if not config.torch_compile:
        return None
    qmodel.add_activation_formats([p.activation for p in (*low_p, *high_p)])
    if config.torch_compile is True:
        return qmodel.torch_compile()
    return qmodel.torch_compile(backend=config.torch_compile)


def _optimize(study: optuna.Study, runner: TrialRunner, n_trials: int, cap: CostCap, *, multi, progress) -> None:
    """Run trials until the study holds ``n_trials`` measured ones (completed or pruned; earlier
    runs' count too), or until another could take the search past ``cap``."""
    bar = tqdm(
        total=n_trials, initial=min(n_measured(study), n_trials), desc="search", unit="trial", disable=not progress
    )

    def on_trial(study_, trial_):
        bar.n = min(n_measured(study_), n_trials)
        if not multi and any(t.state == optuna.trial.TrialState.COMPLETE for t in study_.trials):
            best_trial = study_.best_trial  # with an objective, its raw metric rather than the loss
            bar.set_postfix(best=f"{best_trial.user_attrs.get('metric', best_trial.value):.3f}")
        bar.refresh()

    def stop(study_, trial_):
        if n_measured(study_) >= n_trials or not cap.room(study_):
            study_.stop()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        while cap.room(study) and (asked := runner.gate.remaining(study)) > 0:  # waits for other workers' last ones
            study.optimize(runner, n_trials=asked, callbacks=[on_trial, stop, runner.gate.after_trial])
    bar.close()
