"""The search strategy: no dominated choices, the knapsack optimum, the refine strategy,
pruning against the incumbent, re-scoring on shared windows."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import optuna
import pytest
import torch
from tiny_models import captured

import mpqc
from mpqc.search import SearchConfig, SearchSpace
from mpqc.search.budget import Budget, search_precisions
from mpqc.search.knapsack import solve_knapsack
from mpqc.search.pruning import IncumbentPruner
from mpqc.search.trials import TrialRunner
from mpqc.search.workers import measured

HERE = os.path.dirname(__file__)
TOKENS = torch.randint(0, 128, (8000,), generator=torch.Generator().manual_seed(0))
FAST = dict(seq_len=16, n_samples=8, batch_size=2, progress=False)


def lows(plan, graph) -> set[str]:
    """The matmul components a plan sends low (MXINT4 here)."""
    return {c.name for c in graph.components("matmul") if plan.precision(c.name).weight.name == "mxint4"}


def zero_size(graph):
    return {c.name for c in graph.components("matmul") if c.params == 0}


# ---- no dominated choices ----------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["refine", "knapsack", "sensitivity", "random", "tpe", "qmc"])
def test_no_trial_sends_a_zero_size_component_low(sampler):
    _, graph = captured("llama")
    assert zero_size(graph)  # the attention matmuls: a real case to test
    result = mpqc.search.run(graph, TOKENS, ratio=0.5, sampler=sampler, n_trials=4, **FAST)
    for t in result.study.trials:
        assert not set(t.user_attrs["low"]) & zero_size(graph), (t.number, t.user_attrs["low"])
        assert not any(k[2:] in zero_size(graph) for k in t.params)  # not even a variable
    assert not lows(result.plan, graph) & zero_size(graph)


def test_asked_to_the_search_includes_them_and_a_macs_budget_counts_them():
    _, graph = captured("llama")
    asked = mpqc.search.run(graph, TOKENS, ratio=0.5, sampler="random", n_trials=6, search_dominated=True, **FAST)
    assert any(set(t.user_attrs["low"]) & zero_size(graph) for t in asked.study.trials)
    low, high = search_precisions("mxint4", "bf16", weights_only=False)
    macs = SearchSpace(graph, "matmul", low, high, Budget("macs", 0.5))
    assert zero_size(graph) <= {c.name for c in macs.variables()}  # they cost MACs: they count
    params = SearchSpace(graph, "matmul", low, high, Budget("params", 0.5))
    assert not zero_size(graph) & {c.name for c in params.variables()}
    # weights only: an attention matmul's low precision changes nothing, so it is no variable even by MACs
    w_low, w_high = search_precisions("mxint4", "bf16", weights_only=True)
    w_macs = SearchSpace(graph, "matmul", w_low, w_high, Budget("macs", 0.5))
    assert not zero_size(graph) & {c.name for c in w_macs.variables()}


# ---- knapsack ----------------------------------------------------------------------------------


def brute_force(scores, sizes, target):
    best = None
    names = sorted(scores)
    for k in range(len(names) + 1):
        for subset in itertools.combinations(names, k):
            if sum(sizes[n] for n in subset) >= target - 1e-12:
                key = (sum(scores[n] for n in subset), sum(sizes[n] for n in subset))
                if best is None or key < best[0]:
                    best = (key, set(subset))
    return best[1]


def test_knapsack_is_the_integer_programs_optimum():
    # By hand: greedy by score per unit of size takes a (0.33), b (0.48), then d (0.51) to reach 0.6:
    # score 0.40; the optimum is a + d (score 0.28, size 0.65): a case where the ratio rule is wrong.
    scores = {"a": 0.10, "b": 0.12, "c": 0.25, "d": 0.18, "e": 0.5}
    sizes = {"a": 0.3, "b": 0.25, "c": 0.4, "d": 0.35, "e": 0.1}
    assert set(solve_knapsack(scores, sizes, 0.6)) == brute_force(scores, sizes, 0.6) == {"a", "d"}
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        n = 9
        sc = {f"c{i}": float(torch.rand((), generator=g)) for i in range(n)}
        sz = {f"c{i}": float(torch.rand((), generator=g)) + 0.01 for i in range(n)}
        target = float(torch.rand((), generator=g)) * sum(sz.values())
        got = set(solve_knapsack(sc, sz, target))
        want = brute_force(sc, sz, target)
        assert sum(sc[x] for x in got) == pytest.approx(sum(sc[x] for x in want), abs=1e-12)
    assert solve_knapsack(scores, sizes, 2.0) is None  # unreachable
    assert solve_knapsack(scores, sizes, 0.6, exclude=[{"a", "d"}]) == ["b", "d"]  # the next best: 0.30


def test_the_knapsack_sampler_is_one_evaluation_of_the_optimum_of_the_fisher_scores():
    _, graph = captured("llama")
    result = mpqc.search.run(graph, TOKENS, ratio=0.6, sampler="knapsack", n_trials=1, **FAST)
    sens = result.study.user_attrs["sensitivity"]
    low, high = search_precisions("mxint4", "bf16", weights_only=False)
    space = SearchSpace(graph, "matmul", low, high, Budget("params", 0.6))
    sizes = space.sizes()
    names = [c.name for c in space.variables()]
    want = brute_force({n: sens[n] for n in names[:12]}, sizes, 0.6) if len(names) <= 12 else None
    plan = lows(result.plan, graph)
    assert len(result.study.trials) == 1 and result.decided is None
    assert plan == set(solve_knapsack({n: sens[n] for n in names}, {n: sizes[n] for n in names}, 0.6))
    if want is not None:
        assert plan == want
    assert result.baselines["knapsack"] == result.plan


# ---- the refine strategy -----------------------------------------------------------------------


@pytest.mark.parametrize("budget", [("params", 0.7), ("macs", 0.5), ("bits", 9.0)])
def test_refine_plans_always_meet_the_budget(budget):
    _, graph = captured("qwen2")
    result = mpqc.search.run(graph, TOKENS, budget=budget, sampler="refine", n_trials=8, pruner=None, **FAST)
    complete = [t for t in result.study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 8 and len({frozenset(t.user_attrs["low"]) for t in complete}) == 8  # all distinct
    for t in complete:
        if budget[0] == "bits":
            assert t.user_attrs["average_bits"] <= budget[1] + 1e-9
        else:
            assert t.user_attrs[f"quantization_ratio_{budget[0]}"] >= budget[1] - 1e-9
    assert set(result.study.trials[0].user_attrs["low"]) == lows(result.baselines["knapsack"], graph)


def test_refine_learns_from_measured_losses():
    from mpqc.search.plan_samplers import PlanContext, corrected_costs

    ctx = PlanContext(
        names=("a", "b", "c"),
        sizes={"a": 0.5, "b": 0.5, "c": 0.5},
        target=0.5,
        scores={"a": 1.0, "b": 1.0, "c": 1.0},
        layers={"a": 0, "b": 0, "c": 1},
        base_loss=0.0,
    )
    # Fisher says all three cost the same; the measurements say b costs far more than a.
    costs = corrected_costs(ctx, [(frozenset({"a"}), 0.1), (frozenset({"b"}), 0.9)], ridge=0.1)
    assert costs["b"] > costs["a"] and costs["b"] - costs["a"] > 0.5


def test_refine_starts_from_the_knapsack_plans_of_both_linearizations():
    from mpqc.search.plan_samplers import PlanContext, RefineSampler

    ctx = PlanContext(
        names=("a", "b", "c"),
        sizes={"a": 0.5, "b": 0.5, "c": 0.5},
        target=0.5,
        scores={"a": 1.0, "b": 2.0, "c": 3.0},  # at all-high: a is the cheapest
        layers={"a": 0, "b": 0, "c": 1},
        base_loss=0.0,
        scores_low={"a": 3.0, "b": 1.0, "c": 2.0},  # at all-low: b is
    )
    # Scaled to mean 1 both sum to 6/2; the even blend gives a 2.0, b 1.5, c 2.5: b again.
    sampler = RefineSampler(seed=0, blends=(0.0, 0.5, 1.0))
    sampler.prepare(ctx)
    assert sampler.start_plans() == [frozenset({"a"}), frozenset({"b"})]  # the third is the second's
    # The cost model takes the score of the start plan that measured best: here the all-low one.
    prior = sampler._prior([(frozenset({"a"}), 0.9), (frozenset({"b"}), 0.2)])
    assert min(prior, key=prior.get) == "b"
    assert RefineSampler(seed=0).start_plans() == []  # before prepare: nothing
    with pytest.raises(ValueError, match="blends"):
        RefineSampler(blends=(1.5,))


# ---- pruning and the final choice --------------------------------------------------------------


def test_running_nll_ends_on_the_full_evaluation_bit_for_bit():
    _, graph = captured("llama")
    qmodel = mpqc.compile(graph, mpqc.Plan.uniform(graph, "mxint4"))
    windows = mpqc.evaluate.sample_windows(TOKENS, 16, 7, 0)
    values = list(mpqc.evaluate.running_nll(qmodel, windows, batch_size=2, steps=3))
    assert len(values) == 3 and values[-1] == mpqc.evaluate.nll(qmodel, windows=windows, batch_size=2, progress=False)
    assert len(list(mpqc.evaluate.running_nll(qmodel, windows, batch_size=4, steps=9))) == 2  # one per batch at most


def test_a_pruned_trial_is_recorded_as_pruned_and_never_becomes_the_best():
    _, graph = captured("llama")
    strict = IncumbentPruner(tolerance=0.0, n_steps=4, warmup_steps=0)
    result = mpqc.search.run(graph, TOKENS, ratio=0.5, sampler="random", n_trials=8, pruner=strict, seed=1, **FAST)
    states = [t.state for t in result.study.trials]
    pruned = [t for t in result.study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, "a tolerance of 0 prunes every trial worse than the incumbent at its first chunk"
    # n_trials counts measured trials: the pruned ones too (pruning makes a search cheaper, not longer)
    assert states.count(optuna.trial.TrialState.COMPLETE) + len(pruned) == 8 == len(states)
    complete = [t.number for t in result.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # the contenders re-scored, or the one completed trial when there is no other
    best_numbers = {c["trial"] for c in result.decided["contenders"]} if result.decided else set(complete)
    assert best_numbers and best_numbers <= set(complete)
    assert not best_numbers & {t.number for t in pruned}
    for t in pruned:
        assert t.user_attrs["windows"] < 8 and len(t.intermediate_values) < 4
    assert 0 < result.cost["pruned"] < len(pruned)  # partial evaluations, counted as such


def test_a_search_on_one_batch_of_windows_still_reports_every_chunk():
    # 8 windows in one batch of 8 would give the pruner a single value, at the last step,
    # where it never prunes: the batches shrink to the chunk size instead, and the score of
    # a finished trial is still the full evaluation's, to the bit.
    _, graph = captured("llama")
    fast = {**FAST, "batch_size": 8}
    result = mpqc.search.run(graph, TOKENS, ratio=0.5, sampler="random", n_trials=3, rescore=0, **fast)
    completed = [t for t in result.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert completed and all(sorted(t.intermediate_values) == [0, 1, 2, 3] for t in completed)
    windows = mpqc.evaluate.sample_windows(TOKENS, 16, 8, 0)
    qmodel = mpqc.compile(graph, result.plan)
    assert result.perplexity == mpqc.evaluate.perplexity(qmodel, windows=windows, batch_size=8, progress=False)


def test_rescoring_uses_the_same_windows_for_every_contender(monkeypatch):
    _, graph = captured("llama")
    seen = []
    original = TrialRunner.window_nlls

    def spy(self, plan, windows):
        seen.append((lows(plan, graph), windows.clone()))
        return original(self, plan, windows)

    monkeypatch.setattr(TrialRunner, "window_nlls", spy)
    result = mpqc.search.run(graph, TOKENS, ratio=0.5, sampler="random", n_trials=6, rescore=3, pruner=None, **FAST)
    assert len(seen) == 3 and len({frozenset(p) for p, _ in seen}) == 3
    assert all(torch.equal(seen[0][1], w) for _, w in seen)
    assert result.decided["windows"] == 16 and result.decided["extra_windows"] == 16  # the fresh ones decide
    assert result.decided["anchors"] == [] and result.decided["reference"] is None  # random search has no start plan
    winner = min(result.decided["contenders"], key=lambda c: c["perplexity"])
    assert result.decided["winner"] == winner["trial"]
    assert lows(result.plan, graph) == set(result.study.trials[winner["trial"]].user_attrs["low"])
    # each contender's perplexity is its per-window NLLs' mean, as the spy saw them measured
    space = SearchSpace(
        graph, "matmul", *search_precisions("mxint4", "bf16", weights_only=False), Budget("params", 0.5)
    )
    for row in result.decided["contenders"]:
        qmodel = mpqc.compile(graph, space.plan(result.study.trials[row["trial"]].user_attrs["low"]))
        nlls = mpqc.evaluate.window_nlls(qmodel, seen[0][1], batch_size=2)
        assert row["perplexity"] == pytest.approx(float(torch.exp(nlls.mean())), rel=1e-12)


def test_the_start_plans_are_always_contenders_and_fresh_windows_decide():
    _, graph = captured("llama")
    result = mpqc.search.run(
        graph, TOKENS, ratio=0.5, sampler="refine", n_trials=6, rescore=2, rescore_confidence=0.95, pruner=None, **FAST
    )
    d = result.decided
    starts = {frozenset(p) for p in result.study.sampler.start_plans()}
    assert 1 <= len(starts) <= 3  # the knapsack optima of three blends, some may coincide
    trials = result.study.trials
    assert [frozenset(trials[n].user_attrs["low"]) for n in d["anchors"]] == [
        frozenset(trials[n].user_attrs["low"]) for n in range(len(starts))
    ]  # measured first, in order
    assert {frozenset(trials[n].user_attrs["low"]) for n in d["anchors"]} == starts
    assert set(d["anchors"]) <= {c["trial"] for c in d["contenders"]}
    assert len(d["contenders"]) <= 2 + len(starts)
    # the knapsack plan (the first start) is the reference; only a contender better on the
    # fresh windows by the paired interval may replace it, and the least such wins
    assert d["reference"] == d["anchors"][0] and d["confidence"] == 0.95
    eligible = [c for c in d["contenders"] if c["trial"] == d["reference"] or c["evidence"]]
    fresh = min(eligible, key=lambda c: (c["perplexity"], c["trial"]))
    assert d["winner"] == fresh["trial"]
    assert all(
        (c["nll_gain_lower"] > 0) == c["evidence"] and c["nll_gain_lower"] <= c["nll_gain"] for c in d["contenders"]
    )
    assert lows(result.plan, graph) == set(trials[fresh["trial"]].user_attrs["low"])
    assert result.cost["sensitivity"] == pytest.approx(2 * 3 * 4 / FAST["n_samples"])  # two Fisher passes


class _FixedNlls:
    """A runner whose plans have given per-window NLLs on the fresh windows (plans by name)."""

    def __init__(self, nlls: dict[str, list[float]]):
        self.nlls = {k: torch.tensor(v, dtype=torch.float64) for k, v in nlls.items()}
        self.perplexity = type("P", (), {"windows": torch.zeros(8, 4)})()
        self.space = type("S", (), {"plan": staticmethod(lambda low: "".join(low))})()

    def window_nlls(self, plan, windows):
        return self.nlls[plan]


def _study_of(search_perplexities: dict[str, float]) -> optuna.Study:
    study = optuna.create_study()
    for low, ppl in search_perplexities.items():
        attrs = {"low": [low], "perplexity": ppl}
        study.add_trial(optuna.trial.create_trial(value=ppl, params={}, distributions={}, user_attrs=attrs))
    return study


def test_a_contender_replaces_the_start_plan_only_on_paired_evidence():
    from mpqc.search.decide import rescore

    windows = torch.zeros(4, 4)
    study = _study_of({"A": 30.0, "B": 29.0, "C": 28.0})  # A: the start plan
    steady = [0.9, 0.95, 0.9, 0.95]  # lower on every window
    lucky = [0.5, 1.5, 0.4, 1.4]  # lower on average (0.95), not on evidence
    runner = _FixedNlls({"A": [1.0] * 4, "B": steady, "C": lucky})
    winner, d = rescore(study, runner, windows, 3, anchors=[["A"]], confidence=0.95)
    assert winner.user_attrs["low"] == ["B"] and d["reference"] == 0
    rows = {c["trial"]: c for c in d["contenders"]}
    assert rows[1]["evidence"] and not rows[2]["evidence"]
    assert rows[2]["nll_gain"] == pytest.approx(0.05) and rows[1]["nll_gain"] == pytest.approx(0.075)
    runner = _FixedNlls({"A": [1.0] * 4, "B": [1.0, 1.0, 1.1, 0.99], "C": lucky})
    winner, d = rescore(study, runner, windows, 3, anchors=[["A"]], confidence=0.95)
    assert winner.user_attrs["low"] == ["A"] and d["winner"] == d["reference"] == 0  # kept: no evidence
    winner, d = rescore(study, runner, windows, 3, anchors=[["A"]])  # no confidence: the default
    assert winner.user_attrs["low"] == ["C"] and d["reference"] is None  # the least perplexity
    assert "evidence" not in d["contenders"][0]


def test_the_paired_gain_is_a_one_sided_t_bound():
    from mpqc.search.decide import paired_gain

    # d = 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t(0.95, 2 dof) = 2.919986; 0.2 - 2.919986 * 0.1 / sqrt(3)
    gain, lower = paired_gain(torch.ones(3, dtype=torch.float64), torch.tensor([0.9, 0.8, 0.7]), 0.95)
    assert gain == pytest.approx(0.2) and lower == pytest.approx(0.0314141, abs=1e-6)
    assert paired_gain(torch.ones(3), torch.tensor([0.5, float("inf"), 0.5]), 0.95) == (-math.inf, -math.inf)
    assert paired_gain(torch.tensor([1.0, float("nan")]), torch.ones(2), 0.95) == (math.inf, math.inf)
    assert paired_gain(torch.ones(1), torch.zeros(1), 0.95) == (1.0, -math.inf)  # one window: no interval


def test_rescore_confidence_is_checked():
    with pytest.raises(ValueError, match=r"rescore_confidence must be in \[0.5, 1\) or None"):
        SearchConfig(budget=("params", 0.5), rescore_confidence=1.0)
    assert SearchConfig(budget=("params", 0.5), rescore_confidence=None).rescore_confidence is None


def test_the_paper_setting_is_the_plain_random_search():
    from mpqc.search import PAPER_SETTING

    config = SearchConfig(budget=("params", 0.5), **PAPER_SETTING)
    assert (config.sampler, config.n_trials, config.n_samples) == ("random", 50, 1024)
    assert config.pruner is None and config.rescore == 0 and config.search_dominated


def test_two_workers_with_the_refine_sampler_give_distinct_complete_trials(tmp_path):
    db = str(tmp_path / "shared.db")
    cmd = [sys.executable, os.path.join(HERE, "search_worker.py"), db, "w", "6", "0", "refine"]
    procs = [subprocess.Popen(cmd) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0
    study = optuna.load_study(study_name="w", storage=f"sqlite:///{db}")
    complete = [t for t in study.trials if measured(t)]
    assert len(complete) >= 6
    assert study.user_attrs["sensitivity"]  # computed once, shared through the study


def test_refine_resumes_after_sigkill_without_losing_or_repeating_a_plan(tmp_path):
    import signal
    import time

    db = str(tmp_path / "resume.db")
    cmd = [sys.executable, os.path.join(HERE, "search_worker.py"), db, "r", "7", "0.3", "refine"]
    worker = subprocess.Popen(cmd)
    storage = f"sqlite:///{db}"

    def complete():
        try:
            return [t for t in optuna.load_study(study_name="r", storage=storage).trials if measured(t)]
        except KeyError:
            return []

    deadline = time.time() + 300
    while len(complete()) < 3 and time.time() < deadline and worker.poll() is None:
        time.sleep(0.5)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    before = {t.number: t.user_attrs["low"] for t in complete()}
    assert 3 <= len(before) < 7
    time.sleep(2.5)  # past the heartbeat grace period
    subprocess.run(
        [sys.executable, os.path.join(HERE, "search_worker.py"), db, "r", "7", "0", "refine"], check=True, timeout=300
    )
    after = complete()
    assert len(after) == 7
    assert all(before[t.number] == t.user_attrs["low"] for t in after if t.number in before)
    assert len({frozenset(t.user_attrs["low"]) for t in after}) == 7


# ---- a cap on the cost -------------------------------------------------------------------------


@pytest.mark.parametrize(("sampler", "pruner"), [("refine", None), ("refine", "incumbent"), ("random", "incumbent")])
def test_max_cost_stops_the_search_before_it_could_pass_the_cap(sampler, pruner):
    _, graph = captured("llama")
    result = mpqc.search.run(
        graph, TOKENS, ratio=0.5, sampler=sampler, n_trials=40, max_cost=14, pruner=pruner, rescore=3, **FAST
    )
    cost = result.cost
    assert cost["total"] <= 14 and cost["rescore"] > 0  # the re-scoring ran, and fit
    assert sum(measured(t) for t in result.study.trials) < 40
    assert any("max_cost=14" in note for note in result.notes)
    # it stopped only when the next trial (at a full evaluation) and the re-scoring it could
    # leave (each contender scored on 16 fresh windows: 2 evaluations) might not have fit
    n_anchors = len(result.study.sampler.start_plans()) if sampler == "refine" else 0
    worst_rescore = 2 * (3 + n_anchors)
    assert cost["total"] - cost["rescore"] + 1 + worst_rescore > 14


def test_max_cost_without_room_for_one_trial_is_refused():
    _, graph = captured("llama")
    # refine spends two Fisher passes (1.5 each on 4 windows of 8) and the all-high plan first
    with pytest.raises(ValueError, match=r"max_cost=3 full evaluations leaves no room for a trial: 4.0 were spent"):
        mpqc.search.run(graph, TOKENS, ratio=0.5, sampler="refine", n_trials=5, max_cost=3, **FAST)


def test_without_max_cost_the_search_runs_its_trials():
    _, graph = captured("llama")
    result = mpqc.search.run(graph, TOKENS, ratio=0.5, sampler="random", n_trials=5, rescore=0, **FAST)
    assert sum(measured(t) for t in result.study.trials) == 5
    assert not any("max_cost" in note for note in result.notes)


def test_max_cost_is_checked_and_the_command_line_passes_it():
    from mpqc.cli import build_parser
    from mpqc.cli.search import _config

    for bad in (0, -1.0, True, "50"):
        with pytest.raises(ValueError, match=r"max_cost must be a number of full evaluations > 0, or None"):
            SearchConfig(budget=("params", 0.5), max_cost=bad)
    assert _config(build_parser().parse_args(["search", "m", "--max-cost", "50"]), None, ()).max_cost == 50.0
    assert _config(build_parser().parse_args(["search", "m"]), None, ()).max_cost is None


def test_each_role_draws_its_own_windows_from_its_own_seed():
    config = SearchConfig(budget=("params", 0.5), seq_len=16, n_samples=8, seed=3, sensitivity_windows=4, prefix=(5,))
    expected = {"search": (8, 3), "fisher": (4, 4), "fresh": (16, 5)}  # re-scoring: twice n_samples
    for role, (n, seed) in expected.items():
        assert torch.equal(config.windows(TOKENS, role), mpqc.evaluate.sample_windows(TOKENS, 16, n, seed, (5,)))
    assert not torch.equal(config.windows(TOKENS, "search")[:4], config.windows(TOKENS, "fisher"))
    with pytest.raises(ValueError, match="windows are drawn for search, fisher, fresh; got 'held-out'"):
        config.windows(TOKENS, "held-out")
