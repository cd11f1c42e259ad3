"""mpqc.search.run: an Optuna study over plans under a budget, on one compiled model.

Each trial decodes the sampler's priorities into a plan that meets the budget, switches the
one compiled model to it (``set_plan``: no recapture, weights cached per format) and
evaluates perplexity on windows sampled once. With ``storage`` (a SQLite path or any
SQLAlchemy URL, e.g. PostgreSQL) the study persists: a killed search started again with
the same storage and study name continues, and several processes can share one study.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import os
import socket
import time
import warnings

import optuna
import torch
from tqdm.auto import tqdm

from mpqc.compile import QuantizedModel, compile
from mpqc.evaluate import nll, sample_windows
from mpqc.graph import Graph
from mpqc.plan import Plan

from .budget import Budget, SearchSpace, decode, low_precision
from .samplers import MULTI_OBJECTIVE, make_sampler, sampler_label
from .sensitivity import priorities_from_sensitivity, sensitivity

# The paper's setting (Cao et al. 2024): random search, 50 trials, 1024 sampled sequences.
PAPER_SETTING = {"sampler": "random", "n_trials": 50, "n_samples": 1024}
REACH_TOLERANCE = 0.01  # an achieved budget further than this from the asked one is reported


@dataclasses.dataclass
class SearchResult:
    plan: Plan
    perplexity: float
    achieved: float  # the best plan's budget value (ratio, or average bits)
    budget: Budget
    study: optuna.Study
    notes: list[str]
    pareto: list[dict] | None = None  # nsga2: [{"perplexity", "ratio", "trial"}], best ratio first
    holdout: dict | None = None  # filled by callers that also evaluate on held-out text

    def trials_table(self) -> list[dict]:
        rows = []
        for t in self.study.trials:
            rows.append({
                "trial": t.number,
                "state": t.state.name,
                "perplexity": t.user_attrs.get("perplexity"),
                "achieved": t.user_attrs.get("achieved"),
                "quantization_ratio_params": t.user_attrs.get("quantization_ratio_params"),
                "quantization_ratio_macs": t.user_attrs.get("quantization_ratio_macs"),
                "average_bits": t.user_attrs.get("average_bits"),
                "n_low": len(t.user_attrs.get("low", [])),
                "seeded": t.user_attrs.get("seeded", False),
                "best_so_far": None,
            })
        best = math.inf
        for r in sorted(rows, key=lambda r: r["trial"]):
            if r["state"] == "COMPLETE" and r["perplexity"] is not None:
                best = min(best, r["perplexity"])
            r["best_so_far"] = None if best == math.inf else best
        return rows

    def to_dict(self) -> dict:
        return {
            "perplexity": self.perplexity,
            "achieved": self.achieved,
            "budget": dataclasses.asdict(self.budget),
            "study_name": self.study.study_name,
            "n_complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in self.study.trials),
            "notes": self.notes,
            "plan": self.plan.to_dict(),
            "pareto": self.pareto,
            "holdout": self.holdout,
        }


def _storage(storage, *, heartbeat: int):
    if storage is None:
        return None
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    url = storage if "://" in str(storage) else f"sqlite:///{os.path.abspath(storage)}"
    last_error = None
    for attempt in range(5):  # workers starting together race to create the tables: retry
        try:
            return _rdb_storage(url, heartbeat)
        except Exception as e:  # noqa: BLE001 - SQLAlchemy raises many kinds
            last_error = e
            if "IntegrityError" not in type(e).__name__ and "UniqueViolation" not in str(e):
                break
            time.sleep(0.5 * (attempt + 1))
    e = last_error
    raise ValueError(f"cannot open search storage {url!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def _rdb_storage(url: str, heartbeat: int):
    # Heartbeats let a restarted or sibling worker see a killed worker's trial as failed;
    # the retry callback runs that trial again, so completed trials stay once each.
    params = inspect.signature(optuna.storages.RDBStorage).parameters
    new_api = "heartbeat_stale_trial_callback" in params  # optuna >= 4.9 renamed both
    key = "heartbeat_stale_trial_callback" if new_api else "failed_trial_callback"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry_cls = optuna.storages.RetryHeartbeatStaleTrialCallback if new_api else optuna.storages.RetryFailedTrialCallback
        retry = retry_cls(max_retry=2)
        return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat, **{key: retry})


def _fingerprint(graph: Graph) -> str:
    names = "\n".join(f"{m.name}:{m.params}" for m in graph.matmuls)
    return hashlib.sha256(f"{graph.model_class}\n{names}".encode()).hexdigest()[:16]


def run(
    graph: Graph,
    tokens: torch.Tensor,
    *,
    ratio: float | None = None,
    budget: Budget | tuple | None = None,
    granularity="matmul",
    low: str = "mxint4",
    high: str = "bf16",
    weights_only: bool = False,
    sampler="sensitivity",
    sampler_kwargs: dict | None = None,
    n_trials: int = 50,
    seq_len: int = 256,
    n_samples: int = 32,
    batch_size: int = 8,
    seed: int = 0,
    sampler_seed: int | None = None,
    storage=None,
    study_name: str | None = None,
    block_size=None,
    rounding: str = "nearest",
    n_seeded: int = 4,
    sensitivity_windows: int = 4,
    qmodel: QuantizedModel | None = None,
    progress: bool = True,
    heartbeat: int = 10,
) -> SearchResult:
    """Find the plan with the lowest perplexity on ``tokens`` under the budget.

    The budget is ``ratio`` (Q_r by parameters, the paper's) or ``budget``: a ``Budget`` or
    ("params"|"macs", ratio) or ("bits", average bits). ``low``/``high``: the two precisions
    (``weights_only`` keeps activations at ``high``). ``sampler``: a name, "module:Class",
    or an Optuna sampler; ``sampler_seed`` (default ``seed``) seeds it apart from the evaluation windows,
    so workers sharing one study can sample differently. ``n_trials`` counts completed trials in the study, including ones
    from earlier runs on the same storage. ``qmodel``: a compiled model of ``graph`` to reuse.
    """
    if (ratio is None) == (budget is None):
        raise ValueError("give exactly one of ratio= (Q_r by parameters) or budget= (a Budget or (kind, value))")
    budget = Budget("params", ratio) if ratio is not None else (budget if isinstance(budget, Budget) else Budget(*budget))
    if not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials must be a positive int, got {n_trials!r}")
    low_p, high_p = low_precision(low, high, weights_only=weights_only)
    space = SearchSpace(graph, granularity, low_p, high_p, budget, block_size, rounding)
    multi = sampler in MULTI_OBJECTIVE
    the_sampler = make_sampler(sampler, seed=seed if sampler_seed is None else sampler_seed, kwargs=sampler_kwargs)
    notes = []
    lo, hi = space.reachable()
    if budget.kind != "bits" and budget.value > hi + 1e-12:
        raise ValueError(f"{budget} is unreachable: with everything {low_p} the ratio is {hi:.4f}")
    if budget.kind == "bits" and budget.value < lo - 1e-12:
        raise ValueError(f"{budget} is unreachable: with everything {low_p} the average is {lo:.4f} bits")

    sizes, target = space.sizes(), space.target()
    names = [c.name for c in space.components]
    windows = sample_windows(tokens, seq_len, n_samples, seed)
    config = {
        "graph": _fingerprint(graph), "budget": dataclasses.asdict(budget), "granularity": space.plan([]).granularity_label,
        "low": str(low_p), "high": str(high_p), "block_size": block_size, "rounding": rounding,
        "seq_len": seq_len, "n_samples": n_samples, "seed": seed, "multi_objective": multi,
    }
    directions = ["minimize", "maximize"] if multi else ["minimize"]
    rdb = _storage(storage, heartbeat=heartbeat)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = study_name or f"mpqc-{config['graph']}-{budget.kind}{budget.value:g}-{config['granularity']}-{low}"
    try:
        study = optuna.create_study(storage=rdb, study_name=name, sampler=the_sampler, directions=directions,
                                    load_if_exists=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot create or load study {name!r} in {storage!r}: {e}") from e
    stored = study.user_attrs.get("mpqc_config")
    if stored is None:
        study.set_user_attr("mpqc_config", config)
    elif stored != config:
        diff = {k: (stored.get(k), config.get(k)) for k in set(stored) | set(config) if stored.get(k) != config.get(k)}
        raise ValueError(f"study {name!r} was created for another search; differing settings (stored, asked): {diff}. "
                         "Use another study_name or the same settings.")

    qmodel = qmodel or compile(graph, space.plan([]))
    if qmodel.graph is not graph:
        raise ValueError("qmodel was compiled from another graph")

    def evaluate_plan(plan: Plan) -> float:
        qmodel.set_plan(plan)
        value = math.exp(nll(qmodel, windows=windows, batch_size=batch_size, progress=False))
        return value if math.isfinite(value) else math.inf

    def objective(trial: optuna.Trial):
        goal = target
        if multi:  # the ratio itself is searched: one study spans the Pareto front
            goal = trial.suggest_float("target", target, max(target, sum(sizes.values())))
        priorities = {n: trial.suggest_float(f"p:{n}", 0.0, 1.0) for n in names}
        chosen = decode(priorities, sizes, goal)
        plan = space.plan(chosen)
        achieved = space.achieved(plan)
        ppl = evaluate_plan(plan)
        s = plan.summary()
        worker = f"{socket.gethostname()}:{os.getpid()}"
        for key, value in {**s, "perplexity": ppl, "achieved": achieved, "low": chosen, "worker": worker}.items():
            trial.set_user_attr(key, value)
        return (ppl, s["quantization_ratio_params"]) if multi else ppl

    # Our strategy: seed the study with the sensitivity ranking and perturbations of it.
    if sampler == "sensitivity" and not study.user_attrs.get("seeded"):
        sens = sensitivity(qmodel, space, sample_windows(tokens, seq_len, sensitivity_windows, seed + 1),
                           progress=progress)
        base = priorities_from_sensitivity(sens, sizes)
        rng = torch.Generator().manual_seed(seed)
        for k in range(n_seeded):
            noise = 0.0 if k == 0 else 0.05 * k
            pr = {n: min(1.0, max(0.0, p + noise * (2 * torch.rand((), generator=rng).item() - 1))) for n, p in base.items()}
            study.enqueue_trial({f"p:{n}": v for n, v in pr.items()}, user_attrs={"seeded": True})
        study.set_user_attr("seeded", True)
        study.set_user_attr("sensitivity", sens)

    def n_complete():
        return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))

    bar = tqdm(total=n_trials, initial=min(n_complete(), n_trials), desc="search", unit="trial", disable=not progress)

    def on_trial(study_, trial_):
        bar.n = min(n_complete(), n_trials)
        if not multi and any(t.state == optuna.trial.TrialState.COMPLETE for t in study_.trials):
            bar.set_postfix(best=f"{study_.best_value:.3f}")
        bar.refresh()

    stop = optuna.study.MaxTrialsCallback(n_trials, states=(optuna.trial.TrialState.COMPLETE,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        while n_complete() < n_trials:
            study.optimize(objective, n_trials=n_trials - n_complete(), callbacks=[on_trial, stop])
    bar.close()
    return _result(study, space, budget, multi, notes, evaluate_plan)


def _result(study, space: SearchSpace, budget: Budget, multi: bool, notes: list, evaluate_plan) -> SearchResult:
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pareto = None
    if multi:
        front = sorted(study.best_trials, key=lambda t: -t.values[1])
        pareto = [{"trial": t.number, "perplexity": t.values[0], "quantization_ratio_params": t.values[1],
                   "low": t.user_attrs["low"]} for t in front]
        meeting = [t for t in complete if t.user_attrs["achieved"] >= budget.value - 1e-9] if budget.kind != "bits" else complete
        best = min(meeting or complete, key=lambda t: t.values[0])
    else:
        best = min(complete, key=lambda t: t.value)
    plan = space.plan(best.user_attrs["low"])
    achieved = space.achieved(plan)
    if not multi and abs(achieved - budget.value) > REACH_TOLERANCE:
        notes.append(f"asked {budget}, the nearest the {space.plan([]).granularity_label} granularity allows "
                     f"is {achieved:.4f}")
    return SearchResult(plan=plan, perplexity=best.user_attrs["perplexity"], achieved=achieved, budget=budget,
                        study=study, notes=notes, pareto=pareto)


def write_outputs(result: SearchResult, out_dir: str) -> dict[str, str]:
    """best_plan.json, trials.csv, result.json (and pareto.csv with nsga2), each written atomically."""
    import csv
    import io

    from mpqc.cli import write_json_atomic, write_text_atomic

    os.makedirs(out_dir, exist_ok=True)
    paths = {"plan": os.path.join(out_dir, "best_plan.json"), "trials": os.path.join(out_dir, "trials.csv"),
             "result": os.path.join(out_dir, "result.json")}
    write_text_atomic(paths["plan"], result.plan.to_json())
    rows = result.trials_table()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(paths["trials"], buf.getvalue())
    write_json_atomic(paths["result"], result.to_dict())
    if result.pareto is not None:
        paths["pareto"] = os.path.join(out_dir, "pareto.csv")
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["trial", "perplexity", "quantization_ratio_params", "n_low"])
        for p in result.pareto:
            w.writerow([p["trial"], p["perplexity"], p["quantization_ratio_params"], len(p["low"])])
        write_text_atomic(paths["pareto"], buf.getvalue())
    return paths
