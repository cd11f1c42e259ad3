"""mpqc.search.run: an Optuna study over plans under a budget, on one compiled model.

Each trial decodes the sampler's priorities into a plan that meets the budget, switches the
one compiled model to it (``set_plan``: no recapture, weights cached per format) and
evaluates perplexity on windows sampled once, or with ``objective=LMEvalObjective(...)`` an
lm-eval-harness task's metric on the same compiled model (``mpqc.search.lm_eval_adapter``).
With ``storage`` (a SQLite path or any
SQLAlchemy URL, e.g. PostgreSQL) the study persists: a killed search started again with
the same storage and study name continues, and several processes can share one study.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
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
    # With an objective (e.g. LMEvalObjective): the best plan's raw metric (e.g. accuracy) and
    # what was optimized ({"label", "metric", "higher_is_better", "loss", settings}); perplexity
    # stays the best plan's perplexity on the search windows.
    metric: float | None = None
    objective: dict | None = None
    # With torch_compile: the best plan's perplexity on the same windows, evaluated eagerly.
    # Inductor's float reductions differ from eager ones by ulps, which a deeply quantized
    # model can amplify (docs/performance.md); eager is the reference, so both are reported.
    eager_perplexity: float | None = None

    def trials_table(self) -> list[dict]:
        rows = []
        for t in self.study.trials:
            rows.append({
                "trial": t.number,
                "state": t.state.name,
                "perplexity": t.user_attrs.get("perplexity"),
                "objective": t.user_attrs.get("objective"),
                "metric": t.user_attrs.get("metric"),
                "achieved": t.user_attrs.get("achieved"),
                "quantization_ratio_params": t.user_attrs.get("quantization_ratio_params"),
                "quantization_ratio_macs": t.user_attrs.get("quantization_ratio_macs"),
                "average_bits": t.user_attrs.get("average_bits"),
                "n_low": len(t.user_attrs.get("low", [])),
                "seeded": t.user_attrs.get("seeded", False),
                "best_so_far": None,
            })
        # best_so_far: the perplexity, or with an objective its raw metric, of the best trial so far.
        best, best_row = math.inf, None
        for r in sorted(rows, key=lambda r: r["trial"]):
            loss = r["objective"] if r["objective"] is not None else r["perplexity"]
            if r["state"] == "COMPLETE" and loss is not None and (best_row is None or loss < best):
                best, best_row = loss, r
            r["best_so_far"] = None if best_row is None else (
                best_row["metric"] if best_row["objective"] is not None else best_row["perplexity"])
        return rows

    def to_dict(self) -> dict:
        return {
            "perplexity": self.perplexity,
            "eager_perplexity": self.eager_perplexity,
            "metric": self.metric,
            "objective": self.objective,
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
    objective=None,
    torch_compile=False,
    prefix: tuple[int, ...] = (),
) -> SearchResult:
    """Find the plan with the lowest perplexity on ``tokens`` (or the best ``objective``) under the budget.

    The budget is ``ratio`` (Q_r by parameters, the paper's) or ``budget``: a ``Budget`` or
    ("params"|"macs", ratio) or ("bits", average bits). ``low``/``high``: the two precisions
    (``weights_only`` keeps activations at ``high``). ``sampler``: a name, "module:Class",
    or an Optuna sampler; ``sampler_seed`` (default ``seed``) seeds it apart from the evaluation windows,
    so workers sharing one study can sample differently. ``n_trials`` counts completed trials in the study, including ones
    from earlier runs on the same storage. ``qmodel``: a compiled model of ``graph`` to reuse.

    ``objective``: None (perplexity on ``n_samples`` windows of ``seq_len`` tokens of ``tokens``)
    or an object with ``config() -> dict`` (JSON-ready; it joins the stored study's settings, so
    a study made with another objective is refused) and ``evaluate(qmodel)`` returning a score
    with ``.loss`` (minimized), ``.value`` and ``.metric``, e.g.
    ``mpqc.search.lm_eval_adapter.LMEvalObjective(task="mmlu", tokenizer=tok, limit=100)``. It
    scores the one compiled model after ``set_plan`` (no recapture). Each trial then records the
    raw metric (``user_attrs["metric"]``) and also the window perplexity (one more pass over
    ``n_samples`` windows, small next to a task), so trials.csv and result.json keep a
    perplexity for every plan.

    ``prefix``: token ids every window starts with (``mpqc.data.text_prefix(tokenizer)``: the BOS).

    ``torch_compile``: True (or a torch.compile backend) evaluates through ``torch.compile(qmodel)``. The low and high formats are
    declared up front, so the whole search is one compile (plus one per new batch shape); it
    pays off when trials outnumber the compile's cost (benchmarks/trial_cost.py). The best plan
    is then evaluated once more eagerly (``result.eager_perplexity``), the reference number.
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
    prefix = tuple(int(t) for t in prefix)
    windows = sample_windows(tokens, seq_len, n_samples, seed, prefix)
    config = {
        "graph": _fingerprint(graph), "budget": dataclasses.asdict(budget), "granularity": space.plan([]).granularity_label,
        "low": str(low_p), "high": str(high_p), "block_size": block_size, "rounding": rounding,
        "seq_len": seq_len, "n_samples": n_samples, "seed": seed, "multi_objective": multi,
    }
    if prefix:  # only then: studies stored before windows had prefixes still resume
        config["prefix"] = list(prefix)
    if objective is not None:
        for attr in ("config", "evaluate"):
            if not callable(getattr(objective, attr, None)):
                raise TypeError(f"objective must have config() and evaluate(qmodel) (e.g. LMEvalObjective); "
                                f"{type(objective).__name__} has no {attr}()")
        # Only a non-default objective adds the key: studies stored before it existed still resume.
        config["objective"] = json.loads(json.dumps(objective.config()))
    directions = ["minimize", "maximize"] if multi else ["minimize"]
    rdb = _storage(storage, heartbeat=heartbeat)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = study_name or f"mpqc-{config['graph']}-{budget.kind}{budget.value:g}-{config['granularity']}-{low}"
    if objective is not None and study_name is None:
        name += f"-{config['objective'].get('kind', 'objective')}-{config['objective'].get('task', '')}"
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
        what = ""
        if "objective" in diff:
            what = (f" It was made with objective {_objective_label(stored.get('objective'))}, "
                    f"asked {_objective_label(config.get('objective'))}.")
        raise ValueError(f"study {name!r} was created for another search;{what} differing settings (stored, asked): "
                         f"{diff}. Use another study_name or the same settings.")

    qmodel = qmodel or compile(graph, space.plan([]))
    if qmodel.graph is not graph:
        raise ValueError("qmodel was compiled from another graph")

    forward = qmodel
    if torch_compile:
        qmodel.add_activation_formats([low_p.activation, high_p.activation])
        forward = qmodel.torch_compile() if torch_compile is True else qmodel.torch_compile(backend=torch_compile)

    def evaluate_plan(plan: Plan, run=forward) -> float:
        qmodel.set_plan(plan)
        mean = nll(run, windows=windows, batch_size=batch_size, progress=False)
        value = math.exp(mean) if mean <= 709.0 else math.inf  # exp overflows past ~709.78
        return value if math.isfinite(value) else math.inf

    def measure(plan: Plan) -> tuple[float, dict]:
        """(what the study minimizes, what the trial records) for ``plan``."""
        ppl = evaluate_plan(plan)
        if objective is None:
            return ppl, {"perplexity": ppl}
        score = objective.evaluate(qmodel)  # the same compiled model, now on ``plan``
        loss = float(score.loss)
        loss = loss if math.isfinite(loss) else math.inf
        return loss, {"perplexity": ppl, "objective": loss, "metric": float(score.value), "metric_name": score.metric,
                      "higher_is_better": bool(getattr(score, "higher_is_better", False))}

    def trial_objective(trial: optuna.Trial):
        goal = target
        if multi:  # the ratio itself is searched: one study spans the Pareto front
            goal = trial.suggest_float("target", target, max(target, sum(sizes.values())))
        priorities = {n: trial.suggest_float(f"p:{n}", 0.0, 1.0) for n in names}
        chosen = decode(priorities, sizes, goal)
        plan = space.plan(chosen)
        achieved = space.achieved(plan)
        loss, measured = measure(plan)
        s = plan.summary()
        worker = f"{socket.gethostname()}:{os.getpid()}"
        for key, value in {**s, **measured, "achieved": achieved, "low": chosen, "worker": worker}.items():
            trial.set_user_attr(key, value)
        return (loss, s["quantization_ratio_params"]) if multi else loss

    # Our strategy: seed the study with the sensitivity ranking and perturbations of it.
    if sampler == "sensitivity" and not study.user_attrs.get("seeded"):
        sens = sensitivity(qmodel, space, sample_windows(tokens, seq_len, sensitivity_windows, seed + 1, prefix),
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
            best_trial = study_.best_trial  # with an objective, its raw metric rather than the loss
            bar.set_postfix(best=f"{best_trial.user_attrs.get('metric', best_trial.value):.3f}")
        bar.refresh()

    stop = optuna.study.MaxTrialsCallback(n_trials, states=(optuna.trial.TrialState.COMPLETE,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        while n_complete() < n_trials:
            study.optimize(trial_objective, n_trials=n_trials - n_complete(), callbacks=[on_trial, stop])
    bar.close()
    result = _result(study, space, budget, multi, notes, config.get("objective"))
    if torch_compile:
        result.eager_perplexity = evaluate_plan(result.plan, run=qmodel)
    return result


def _objective_label(config: dict | None) -> str:
    if config is None:
        return "perplexity on windows"
    if config.get("kind") == "lm_eval":
        return (f"lm-eval {config.get('task')}" + (f" {config['metric']}" if config.get("metric") else "")
                + (f" (limit {config['limit']})" if config.get("limit") is not None else ""))
    return str(config.get("kind", config))


def _result(study, space: SearchSpace, budget: Budget, multi: bool, notes: list, objective: dict | None) -> SearchResult:
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pareto = None
    if multi:
        front = sorted(study.best_trials, key=lambda t: -t.values[1])
        pareto = [{"trial": t.number, "perplexity": t.user_attrs.get("perplexity", t.values[0]),
                   "quantization_ratio_params": t.values[1], "low": t.user_attrs["low"]} for t in front]
        if objective is not None:
            for p, t in zip(pareto, front):
                p.update(objective=t.values[0], metric=t.user_attrs.get("metric"))
        meeting = [t for t in complete if t.user_attrs["achieved"] >= budget.value - 1e-9] if budget.kind != "bits" else complete
        best = min(meeting or complete, key=lambda t: t.values[0])
    else:
        best = min(complete, key=lambda t: t.value)
    plan = space.plan(best.user_attrs["low"])
    achieved = space.achieved(plan)
    if not multi and abs(achieved - budget.value) > REACH_TOLERANCE:
        # The nearest reachable value is a subset-sum question; report what the trials found.
        values = [t.user_attrs["achieved"] for t in complete]
        closest = max(values) if budget.kind == "bits" else min(values)
        notes.append(f"asked {budget}, the nearest the {space.plan([]).granularity_label} granularity allows "
                     f"in these trials is {closest:.4f}; the best plan reaches {achieved:.4f}")
    described = None
    if objective is not None:
        described = {"label": _objective_label(objective), "metric": best.user_attrs.get("metric_name"),
                     "higher_is_better": best.user_attrs.get("higher_is_better"), "loss": best.values[0],
                     "settings": objective}
    return SearchResult(plan=plan, perplexity=best.user_attrs["perplexity"], achieved=achieved, budget=budget,
                        study=study, notes=notes, pareto=pareto, metric=best.user_attrs.get("metric"),
                        objective=described)


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
