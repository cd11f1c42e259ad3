"""What a search returns and writes: the result, its trials table, the output files."""

from __future__ import annotations

import dataclasses
import math
import os

import optuna

from mpqc.io import write_csv_atomic, write_json_atomic, write_text_atomic
from mpqc.plan import Plan

from .budget import Budget, SearchSpace
from .storage import objective_label
from .workers import measured

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
    # How the best plan was named: {"windows", "contenders": [...], "winner"} after re-scoring
    # (None when the best trial was taken as it is), and what the search cost, in full
    # evaluations of its windows ({"trials", "pruned", "sensitivity", "base", "rescore", "total"}).
    decided: dict | None = None
    cost: dict | None = None
    # The plans this one is judged against: {"all_high", "all_low", "knapsack"} -> Plan.
    baselines: dict | None = None

    def trials_table(self) -> list[dict]:
        rows = [_trial_row(t) for t in self.study.trials]
        # best_so_far: the perplexity, or with an objective its raw metric, of the best trial so far.
        best, best_row = math.inf, None
        for r in sorted(rows, key=lambda r: r["trial"]):
            loss = r["objective"] if r["objective"] is not None else r["perplexity"]
            if r["state"] == "COMPLETE" and loss is not None and (best_row is None or loss < best):
                best, best_row = loss, r
            r["best_so_far"] = (
                None
                if best_row is None
                else (best_row["metric"] if best_row["objective"] is not None else best_row["perplexity"])
            )
        return rows

    def to_dict(self) -> dict:
        return {
            "perplexity": self.perplexity,
            "eager_perplexity": self.eager_perplexity,
            "metric": self.metric,
            "objective": self.objective,
            "achieved": self.achieved,
            "budget": dataclasses.asdict(self.budget),
            "q_r_definition": self.plan.q_r_definition,
            "keep_high": list(self.plan.keep_high),
            "study_name": self.study.study_name,
            "n_complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in self.study.trials),
            "n_pruned": sum(measured(t) and t.state != optuna.trial.TrialState.COMPLETE for t in self.study.trials),
            "notes": self.notes,
            "plan": self.plan.to_dict(),
            "pareto": self.pareto,
            "holdout": self.holdout,
            "decided": self.decided,
            "cost": self.cost,
            "baselines": None if self.baselines is None else {k: p.to_dict() for k, p in self.baselines.items()},
        }


def _trial_row(t: optuna.trial.FrozenTrial) -> dict:
    attrs = t.user_attrs
    return {
        "trial": t.number,
        "state": t.state.name,
        "perplexity": attrs.get("perplexity"),
        "objective": attrs.get("objective"),
        "metric": attrs.get("metric"),
        "achieved": attrs.get("achieved"),
        "quantization_ratio_params": attrs.get("quantization_ratio_params"),
        "quantization_ratio_macs": attrs.get("quantization_ratio_macs"),
        "average_bits": attrs.get("average_bits"),
        "n_low": len(attrs.get("low", [])),
        "seeded": attrs.get("seeded", False),
        "best_so_far": None,
    }


def best_result(
    study: optuna.Study,
    space: SearchSpace,
    budget: Budget,
    *,
    multi: bool,
    objective: dict | None,
    best: optuna.trial.FrozenTrial | None = None,
) -> SearchResult:
    """The best completed trial as a result (with nsga2: the best meeting the budget, and the front)."""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pareto = None
    if multi:
        pareto = _pareto(study, objective)
        meeting = (
            complete
            if budget.kind == "bits"
            else [t for t in complete if t.user_attrs["achieved"] >= budget.value - 1e-9]
        )
        best = min(meeting or complete, key=lambda t: t.values[0])
    elif best is None:
        best = min(complete, key=lambda t: t.value)
    plan = space.plan(best.user_attrs["low"])
    achieved = space.achieved(plan)
    notes = []
    if not multi and abs(achieved - budget.value) > REACH_TOLERANCE:
        # The nearest reachable value is a subset-sum question; report what the trials found.
        values = [t.user_attrs["achieved"] for t in complete]
        closest = max(values) if budget.kind == "bits" else min(values)
        notes.append(
            f"asked {budget}, the nearest the {space.plan([]).granularity_label} granularity allows "
            f"in these trials is {closest:.4f}; the best plan reaches {achieved:.4f}"
        )
    described = None
    if objective is not None:
        described = {
            "label": objective_label(objective),
            "metric": best.user_attrs.get("metric_name"),
            "higher_is_better": best.user_attrs.get("higher_is_better"),
            "loss": best.values[0],
            "settings": objective,
        }
    return SearchResult(
        plan=plan,
        perplexity=best.user_attrs["perplexity"],
        achieved=achieved,
        budget=budget,
        study=study,
        notes=notes,
        pareto=pareto,
        metric=best.user_attrs.get("metric"),
        objective=described,
    )


def _pareto(study: optuna.Study, objective: dict | None) -> list[dict]:
    front = sorted(study.best_trials, key=lambda t: -t.values[1])
    pareto = [
        {
            "trial": t.number,
            "perplexity": t.user_attrs.get("perplexity", t.values[0]),
            "quantization_ratio_params": t.values[1],
            "low": t.user_attrs["low"],
        }
        for t in front
    ]
    if objective is not None:
        for p, t in zip(pareto, front):
            p.update(objective=t.values[0], metric=t.user_attrs.get("metric"))
    return pareto


def write_outputs(result: SearchResult, out_dir: str) -> dict[str, str]:
    """best_plan.json, trials.csv, result.json (and pareto.csv with nsga2), each written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "plan": os.path.join(out_dir, "best_plan.json"),
        "trials": os.path.join(out_dir, "trials.csv"),
        "result": os.path.join(out_dir, "result.json"),
    }
    write_text_atomic(paths["plan"], result.plan.to_json())
    rows = result.trials_table()
    write_csv_atomic(paths["trials"], rows, list(rows[0]) if rows else ["trial"])
    write_json_atomic(paths["result"], result.to_dict())
    if result.pareto is not None:
        paths["pareto"] = os.path.join(out_dir, "pareto.csv")
        write_csv_atomic(
            paths["pareto"],
            [{**p, "n_low": len(p["low"])} for p in result.pareto],
            ["trial", "perplexity", "quantization_ratio_params", "n_low"],
        )
    return paths
