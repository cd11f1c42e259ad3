"""mpqc.search on tiny models: budgets, samplers, exact objective, resume after SIGKILL, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch
from tiny_models import captured

import mpqc
from mpqc.search import Budget, SearchSpace, decode
from mpqc.search.budget import search_precisions

HERE = os.path.dirname(__file__)
TOKENS = torch.randint(0, 128, (8000,), generator=torch.Generator().manual_seed(0))
FAST = dict(seq_len=16, n_samples=2, progress=False)


# ---- the encoding ------------------------------------------------------------------------------


def test_decode_meets_the_target_with_least_overshoot():
    sizes = {"a": 0.5, "b": 0.3, "c": 0.15, "d": 0.05, "attn": 0.0}
    pr = {"a": 0.9, "b": 0.8, "c": 0.1, "d": 0.2, "attn": 0.7}
    # a (0.5) fits under 0.6; b would overshoot; then d (0.05) fits, c does not; 0.55 < 0.6. Adding the
    # smallest component that reaches 0.6 (c) would give 0.70; c finishing a alone gives 0.65.
    assert sorted(decode(pr, sizes, 0.6)) == ["a", "attn", "c"]
    assert sorted(decode(pr, sizes, 0.55)) == ["a", "attn", "d"]  # met exactly, nothing more
    assert decode({**pr, "attn": 0.3}, sizes, 0.0) == []  # zero-size components go low only above 1/2
    assert sorted(decode(pr, sizes, 1.0)) == ["a", "attn", "b", "c", "d"]


def _old_decode(priorities, sizes, target):
    """The decode before the least-overshoot finish: greedy fill, then the smallest that reaches."""
    eps = 1e-12
    order = sorted(priorities, key=lambda n: (-priorities[n], n))
    chosen, total = [], 0.0
    for name in order:
        size = sizes[name]
        if size == 0:
            if priorities[name] > 0.5:
                chosen.append(name)
        elif total + size <= target + eps:
            chosen.append(name)
            total += size
    if total < target - eps:
        rest = [n for n in order if n not in chosen and sizes[n] > 0]
        meeting = [n for n in rest if total + sizes[n] >= target - eps]
        if meeting:
            chosen.append(min(meeting, key=lambda n: (sizes[n], order.index(n))))
        else:
            chosen.extend(rest)
    return chosen


def _gemma_like_sizes(seed=0):
    """A tied lm_head of 0.626 and 126 layer matmuls of 0.374 together (Gemma 3 270M by parameters)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(126, generator=g, dtype=torch.float64) + 0.5
    small = small / small.sum() * 0.374
    return {"lm_head": 0.626, **{f"layers.{i}": float(x) for i, x in enumerate(small)}}


def test_decode_reaches_a_component_larger_than_the_rest():
    sizes = _gemma_like_sizes()
    largest_small = max(v for k, v in sizes.items() if k != "lm_head")
    plans = set()
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        pr = {n: float(p) for n, p in zip(sizes, torch.rand(len(sizes), generator=g))}
        for target in (0.4, 0.5, 0.6):
            chosen = decode(pr, sizes, target)
            ratio = sum(sizes[n] for n in chosen)
            assert "lm_head" in chosen and 0.626 - 1e-9 <= ratio <= 0.626 + largest_small + 1e-9, (target, ratio)
            assert ratio < 1.0 - 1e-9 and ratio >= target
            assert sum(sizes[n] for n in _old_decode(pr, sizes, target)) == pytest.approx(1.0)  # the old bug
        chosen = decode(pr, sizes, 0.65)  # lm_head plus a few layer matmuls, which ones set by priority
        ratio = sum(sizes[n] for n in chosen)
        assert "lm_head" in chosen and 0.65 <= ratio <= 0.65 + largest_small + 1e-9
        plans.add(frozenset(chosen))
        assert decode(pr, sizes, 0.65) == chosen  # deterministic
    assert len(plans) > 1  # the priorities still choose the plan


def test_decode_never_overshoots_more_than_the_greedy_finish():
    g = torch.Generator().manual_seed(0)
    for case in range(400):
        n = int(torch.randint(1, 40, (1,), generator=g))
        raw = torch.rand(n, generator=g, dtype=torch.float64) ** float(torch.rand(1, generator=g) * 6 + 0.2)
        raw[torch.rand(n, generator=g) < 0.1] = 0.0  # some zero-size components
        if case % 4 == 0:
            raw[0] = raw.sum() * 1.7 + 0.1  # one component larger than all the rest together
        total = float(raw.sum()) or 1.0
        sizes = {f"c{i}": float(x) / total for i, x in enumerate(raw)}
        pr = {k: float(p) for k, p in zip(sizes, torch.rand(n, generator=g))}
        target = float(torch.rand(1, generator=g)) if case % 5 else float(sum(list(sizes.values())[: n // 2]))
        new, old = decode(pr, sizes, target), _old_decode(pr, sizes, target)
        got, was = sum(sizes[k] for k in new), sum(sizes[k] for k in old)
        assert len(set(new)) == len(new)
        assert got >= target - 1e-9 or set(new) >= {k for k, v in sizes.items() if v > 0}, (case, got, target)
        assert got - target <= was - target + 1e-12, (case, got, was, target)
        assert {k for k in new if sizes[k] == 0} == {k for k in sizes if sizes[k] == 0 and pr[k] > 0.5}


def test_every_trial_meets_the_budget():
    _, graph = captured("llama")
    result = mpqc.search.run(graph, TOKENS, ratio=0.7, sampler="random", n_trials=6, **FAST)
    smallest = min(c.params for c in graph.components("matmul") if c.params) / graph.total_params
    for t in result.study.trials:
        assert 0.7 <= t.user_attrs["quantization_ratio_params"] <= 0.7 + smallest + 1e-9
    assert result.achieved == result.plan.quantization_ratio()


@pytest.mark.parametrize("sampler", ["sensitivity", "random", "tpe", "cmaes", "gp", "qmc"])
def test_each_sampler_finds_a_plan_whose_perplexity_is_exact(sampler):
    _, graph = captured("qwen2")
    result = mpqc.search.run(graph, TOKENS, ratio=0.5, sampler=sampler, n_trials=4, seed=3, **FAST)
    assert result.plan.quantization_ratio() >= 0.5
    # The objective is exactly what compile + evaluate of the plan gives on the same windows.
    windows = mpqc.evaluate.sample_windows(TOKENS, 16, 2, 3)
    again = mpqc.evaluate.perplexity(mpqc.compile(graph, result.plan), windows=windows, progress=False)
    assert result.perplexity == again
    assert len([t for t in result.study.trials if t.state.name == "COMPLETE"]) == 4


def test_torch_compiled_search_compiles_once_and_gives_the_same_numbers():
    from torch._dynamo.testing import CompileCounter

    _, graph = captured("llama")
    counter = CompileCounter()  # traces like torch.compile, runs the traced graph eagerly: exact
    torch._dynamo.reset()
    fast = mpqc.search.run(
        graph, TOKENS, ratio=0.5, sampler="random", n_trials=8, seed=2, torch_compile=counter, **FAST
    )
    plain = mpqc.search.run(graph, TOKENS, ratio=0.5, sampler="random", n_trials=8, seed=2, **FAST)
    assert [t.values for t in fast.study.trials] == [t.values for t in plain.study.trials]
    assert len({t.values[0] for t in plain.study.trials}) > 1
    assert counter.frame_count == 1  # eight plans, one graph


def test_compiled_search_reports_the_best_plan_evaluated_eagerly():
    def skewed(gm, example_inputs):  # a "compiler" whose numbers differ from eager ones
        def run(*args):
            return [o * 0.5 if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in gm(*args)]

        return run

    _, graph = captured("llama")
    torch._dynamo.reset()
    fast = mpqc.search.run(graph, TOKENS, ratio=0.5, sampler="random", n_trials=3, seed=2, torch_compile=skewed, **FAST)
    windows = mpqc.evaluate.sample_windows(TOKENS, 16, 2, 2)
    eager = mpqc.evaluate.perplexity(mpqc.compile(graph, fast.plan), windows=windows, progress=False)
    assert fast.eager_perplexity == eager != fast.perplexity
    assert fast.to_dict()["eager_perplexity"] == eager
    plain = mpqc.search.run(graph, TOKENS, ratio=0.5, sampler="random", n_trials=3, seed=2, **FAST)
    assert plain.eager_perplexity is None


def test_windows_start_with_the_prefix():
    _, graph = captured("llama")
    result = mpqc.search.run(graph, TOKENS, ratio=0.5, sampler="random", n_trials=2, seed=3, prefix=(5,), **FAST)
    windows = mpqc.evaluate.sample_windows(TOKENS, 16, 2, 3, prefix=(5,))
    assert (windows[:, 0] == 5).all()
    again = mpqc.evaluate.perplexity(mpqc.compile(graph, result.plan), windows=windows, progress=False)
    assert result.perplexity == again
    assert result.study.user_attrs["mpqc_config"]["prefix"] == [5]


def test_same_seed_same_plan_and_numbers():
    _, graph = captured("llama")
    a = mpqc.search.run(graph, TOKENS, ratio=0.5, sampler="tpe", n_trials=4, seed=1, **FAST)
    b = mpqc.search.run(graph, TOKENS, ratio=0.5, sampler="tpe", n_trials=4, seed=1, **FAST)
    assert a.plan == b.plan and a.perplexity == b.perplexity
    assert [t.params for t in a.study.trials] == [t.params for t in b.study.trials]


def test_nsga2_gives_a_pareto_front():
    _, graph = captured("llama")
    result = mpqc.search.run(graph, TOKENS, ratio=0.3, sampler="nsga2", n_trials=8, **FAST)
    front = result.pareto
    assert front and all(p["quantization_ratio_params"] >= 0.3 - 1e-9 for p in front)
    ratios = [p["quantization_ratio_params"] for p in front]
    assert ratios == sorted(ratios, reverse=True)
    # On the front, a higher ratio never comes with a lower perplexity.
    ppl = [p["perplexity"] for p in front]
    assert all(ppl[i] >= ppl[i + 1] for i in range(len(ppl) - 1))


class CountingSampler(optuna.samplers.RandomSampler):
    calls = 0

    def sample_independent(self, *args, **kwargs):
        CountingSampler.calls += 1
        return super().sample_independent(*args, **kwargs)


def test_custom_sampler_instance_and_import_path():
    _, graph = captured("llama")
    CountingSampler.calls = 0
    mpqc.search.run(graph, TOKENS, ratio=0.5, sampler=CountingSampler(seed=0), n_trials=2, **FAST)
    # one parameter per search variable: zero-size components are not searched (issue 14)
    low, high = search_precisions("mxint4", "bf16", weights_only=False)
    n_variables = len(SearchSpace(graph, "matmul", low, high, Budget("params", 0.5)).variables())
    assert 0 < n_variables < len(graph.components("matmul"))
    assert CountingSampler.calls == 2 * n_variables
    result = mpqc.search.run(graph, TOKENS, ratio=0.5, sampler="test_search:CountingSampler", n_trials=2, **FAST)
    assert isinstance(result.study.sampler, CountingSampler)


def test_bits_and_macs_budgets_and_layer_granularity():
    _, graph = captured("llama")
    bits = mpqc.search.run(graph, TOKENS, budget=("bits", 8.0), sampler="random", n_trials=3, **FAST)
    assert bits.plan.average_bits() <= 8.0
    macs = mpqc.search.run(graph, TOKENS, budget=Budget("macs", 0.5), sampler="random", n_trials=3, **FAST)
    assert macs.plan.quantization_ratio(by="macs") >= 0.5
    layer = mpqc.search.run(graph, TOKENS, ratio=0.5, granularity="layer", sampler="random", n_trials=3, **FAST)
    assert layer.plan.granularity == "layer"
    assert layer.notes and "nearest the layer granularity allows" in layer.notes[0]


@pytest.mark.parametrize("at", ["all-high", "itself-low", "another-low"])
def test_sensitivity_is_the_per_element_fisher_of_weights_and_activations(at):
    """Checked against the gradients of the loss at each quantizer's output, taken directly, at
    the all-high plan and at plans where the component itself (it moves high) or another is low."""
    _, graph = captured("llama")
    low, high = search_precisions("mxint4", "bf16", weights_only=False)
    space = SearchSpace(graph, "matmul", low, high, Budget("params", 0.5))
    name = next(c.name for c in space.components if "down_proj" in c.name)
    neighbour = next(c.name for c in space.components if "up_proj" in c.name)
    low_set = {"all-high": [], "itself-low": [name, neighbour], "another-low": [neighbour]}[at]
    qmodel = mpqc.compile(graph, space.plan(low_set))
    windows = mpqc.evaluate.sample_windows(TOKENS, 16, 2, 0)
    sens = mpqc.search.sensitivity(qmodel, space, windows, at=low_set, progress=False)
    wq = qmodel.weight_quantizers[name]
    (aq,) = [q for q in qmodel.activation_quantizers if name in q.consumers]
    slot = aq.consumers.index(name)
    other = space.plan([] if name in low_set else [name]).weight_format(graph.matmul(name))
    block = None if other.family == "cast" else other.block_size
    taken = {}

    def leaf(key):
        def hook(mod, inputs, out):
            outs = list(out) if isinstance(out, tuple) else [out]
            x = outs[slot] if key == "a" else outs[0]
            taken[key] = (inputs[0].detach(), x.detach().requires_grad_())
            outs[slot if key == "a" else 0] = taken[key][1]
            return tuple(outs) if isinstance(out, tuple) else outs[0]

        return hook

    expected = 0.0
    for window in windows:
        handles = [wq.register_forward_hook(leaf("w")), aq.register_forward_hook(leaf("a"))]
        with torch.enable_grad():
            ids = window[None]
            loss = torch.nn.functional.cross_entropy(qmodel(ids)[0, :-1].float(), ids[0, 1:])
            gw, ga = torch.autograd.grad(loss, [taken["w"][1], taken["a"][1]])
        for h in handles:
            h.remove()
        (w, w_high), (x, x_high) = taken["w"], taken["a"]
        dw = mpqc.formats.quantize(w, other, block_size=block, axis=wq.axis) - w_high.detach()
        dx = mpqc.formats.quantize(x, other, block_size=block, axis=aq.axis) - x_high.detach()
        expected += 0.5 * float((gw.double() * dw).square().sum() + (ga.double() * dx).square().sum()) / len(windows)
    assert sens[name] == pytest.approx(expected, rel=1e-6)
    assert sens[name] > 0


def test_sensitivity_priorities():
    _, graph = captured("llama")
    low, high = search_precisions("mxint4", "bf16", weights_only=False)
    space = SearchSpace(graph, "matmul", low, high, Budget("params", 0.5))
    qmodel = mpqc.compile(graph, space.plan([]))
    sens = mpqc.search.sensitivity(qmodel, space, mpqc.evaluate.sample_windows(TOKENS, 16, 2, 0), progress=False)
    assert set(sens) == {c.name for c in space.components} and all(v >= 0 for v in sens.values())
    assert any(v > 0 for v in sens.values())
    sizes = space.sizes()
    pr = mpqc.search.priorities_from_sensitivity(sens, sizes)
    paying = sorted((n for n in sens if sizes[n] > 0), key=lambda n: sens[n] / sizes[n])
    assert [pr[n] for n in paying] == sorted((pr[n] for n in paying), reverse=True)
    assert all(pr[n] == 0.25 for n in sens if sizes[n] == 0)  # attention matmuls stay high


def test_bad_input():
    _, graph = captured("llama")
    with pytest.raises(ValueError, match=r"ratio must lie in \[0, 1\], got 1.5"):
        mpqc.search.run(graph, TOKENS, ratio=1.5, **FAST)
    with pytest.raises(ValueError, match="unknown sampler 'annealing'"):
        mpqc.search.run(graph, TOKENS, ratio=0.5, sampler="annealing", **FAST)
    with pytest.raises(ValueError, match="unknown format 'mxint3'"):
        mpqc.search.run(graph, TOKENS, ratio=0.5, low="mxint3", **FAST)
    with pytest.raises(ValueError, match="cannot open search storage"):
        mpqc.search.run(graph, TOKENS, ratio=0.5, storage="postgresql+psycopg2://u:p@127.0.0.1:1/db", **FAST)


def test_study_made_for_another_budget_is_refused(tmp_path):
    _, graph = captured("llama")
    db = str(tmp_path / "s.db")
    mpqc.search.run(graph, TOKENS, ratio=0.5, sampler="random", n_trials=2, storage=db, study_name="s", **FAST)
    with pytest.raises(ValueError, match="created for another search.*budget"):
        mpqc.search.run(graph, TOKENS, ratio=0.6, sampler="random", n_trials=3, storage=db, study_name="s", **FAST)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    assert len(study.trials) == 2  # nothing was added or changed


def _complete(db, name):
    try:
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    except KeyError:
        return []
    from mpqc.search.workers import measured

    return [t for t in study.trials if measured(t)]  # what counts toward n_trials


def test_resume_after_sigkill(tmp_path):
    db = str(tmp_path / "resume.db")
    worker = subprocess.Popen([sys.executable, os.path.join(HERE, "search_worker.py"), db, "r", "8", "0.3"])
    deadline = time.time() + 240
    while len(_complete(db, "r")) < 3 and time.time() < deadline and worker.poll() is None:
        time.sleep(0.5)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    before = {t.number: t.params for t in _complete(db, "r")}
    assert 3 <= len(before) < 8
    time.sleep(2.5)  # past the heartbeat grace period: the killed trial is seen as failed and retried
    subprocess.run([sys.executable, os.path.join(HERE, "search_worker.py"), db, "r", "8"], check=True, timeout=240)
    after = _complete(db, "r")
    assert len(after) == 8
    assert all(before[n] == t.params for t in after if (n := t.number) in before)  # none lost
    params = [tuple(sorted(t.params.items())) for t in after]
    assert len(set(params)) == len(params)  # none repeated


def test_example_custom_sampler_plugs_in():
    sys.path.insert(0, os.path.dirname(HERE))
    from examples.custom_sampler import SwapSampler

    _, graph = captured("llama")
    result = mpqc.search.run(graph, TOKENS, ratio=0.5, sampler=SwapSampler(n_startup=2, seed=0), n_trials=5, **FAST)
    trials = result.study.trials
    # After the random start, each trial is the best earlier trial with two priorities swapped.
    best2 = min(trials[:2], key=lambda t: t.value)
    assert sorted(trials[2].params.values()) == sorted(best2.params.values()) and trials[2].params != best2.params
    assert result.plan.quantization_ratio() >= 0.5
