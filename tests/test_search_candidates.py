"""Preference lists of low/high formats: each component takes the first format that stores its
weight rows, so llama.cpp's k-quants are searched where the shapes allow them and their
fallback elsewhere (issue 18: a search whose candidates differ per tensor, as Q4_K_M's do)."""

from __future__ import annotations

import functools

import pytest
import torch
from tiny_models import example_ids, tiny_config
from transformers import AutoModelForCausalLM

import mpqc
from mpqc.export.gguf import q4_k_m_plan
from mpqc.search.budget import Budget, SearchSpace, search_precisions
from mpqc.search.storage import SETTINGS_ATTR

LOW, HIGH = "q4_k,q5_0", "q6_k,q8_0"


@functools.cache
def graph_with_wide_down_proj():
    """A tiny Llama (hidden 64, intermediate 256): only down_proj's rows are whole 256-blocks."""
    torch.manual_seed(0)
    config = tiny_config("llama", intermediate_size=256)
    model = AutoModelForCausalLM.from_config(config).eval()
    return mpqc.capture(model, (example_ids(),))


def space(**kw):
    graph = graph_with_wide_down_proj()
    lows, highs = search_precisions(LOW, HIGH, weights_only=False)
    return SearchSpace(
        graph, "matmul", lows, highs, Budget("bits", 6.5), runtime="llama.cpp", keep_high=("lm_head",), **kw
    )


def test_each_component_takes_the_first_candidate_that_stores_its_rows():
    s = space()
    low = {c.name: s.low_of(c).weight.name for c in s.components if c.matmuls[0].has_weight}
    high = {c.name: s.high_of(c).weight.name for c in s.components if c.matmuls[0].has_weight}
    assert {n for n, f in low.items() if f == "q4_k"} == {n for n in low if n.endswith("down_proj")}
    assert set(low.values()) == {"q4_k", "q5_0"} and set(high.values()) == {"q6_k", "q8_0"}
    assert all((low[n], high[n]) == ("q4_k", "q6_k") for n in low if n.endswith("down_proj"))
    assert s.high_of("lm_head").weight.name == "q8_0"  # 64-wide rows: the kept-high head falls back too
    assert (s.low_label, s.high_label) == (LOW, HIGH)


def test_plans_assign_each_component_its_own_candidate_and_the_bits_budget_counts_them():
    s = space()
    down = "layers.0.mlp.down_proj"
    plan = s.plan([down, "layers.1.self_attn.q_proj"])
    assert plan.weight_format(s.graph.matmul(down)).name == "q4_k"
    assert plan.weight_format(s.graph.matmul("layers.1.self_attn.q_proj")).name == "q5_0"
    assert plan.weight_format(s.graph.matmul("layers.1.mlp.down_proj")).name == "q6_k"
    assert plan.weight_format(s.graph.matmul("layers.1.mlp.up_proj")).name == "q8_0"
    # bits saved: q6_k -> q4_k on down_proj (2.0625 bits), q8_0 -> q5_0 elsewhere (3 bits), by hand
    weights = {m.name: m.weight_shape[0] * m.weight_shape[1] for m in s.graph.matmuls if m.has_weight}
    total = sum(weights.values())
    sizes = s.sizes()
    assert sizes[down] == pytest.approx((6.5625 - 4.5) * weights[down] / total)
    assert sizes["layers.0.mlp.up_proj"] == pytest.approx((8.5 - 5.5) * weights["layers.0.mlp.up_proj"] / total)


def test_the_q4_k_m_recipe_is_a_plan_of_this_space():
    s = space()
    recipe = q4_k_m_plan(s.graph)
    low = [c.name for c in s.variables() if recipe.precision(c.name).weight == s.low_of(c).weight]
    rebuilt = s.plan(low)
    for m in s.graph.matmuls:
        if m.has_weight:
            assert rebuilt.weight_format(m) == recipe.weight_format(m), m.name


def test_a_single_format_that_cannot_store_a_row_is_refused_with_the_fallback_to_add():
    graph = graph_with_wide_down_proj()
    lows, highs = search_precisions("q4_k", "q8_0", weights_only=False)
    with pytest.raises(
        ValueError, match=r"low='q4_k' cannot store component layers\.0\.self_attn\.q_proj.*\[64\].*'q4_k,q8_0'"
    ):
        SearchSpace(graph, "matmul", lows, highs, Budget("bits", 6.0), runtime="llama.cpp")
    with pytest.raises(ValueError, match="comma-separated list"):
        search_precisions("q4_k,,q5_0", "q8_0", weights_only=False)


def test_a_search_over_preference_lists_meets_the_budget_with_each_components_candidates():
    graph = graph_with_wide_down_proj()
    tokens = torch.randint(0, 128, (4000,), generator=torch.Generator().manual_seed(3))
    result = mpqc.search.run(
        graph,
        tokens,
        budget=("bits", 6.5),
        low=LOW.split(","),  # a sequence works as well as the comma-separated spelling
        high=HIGH,
        target="llama.cpp",
        keep_high=("lm_head",),
        n_trials=4,
        seq_len=16,
        n_samples=4,
        batch_size=4,
        progress=False,
    )
    s = space()
    assert result.plan.average_bits() <= 6.5
    for c in s.components:
        assert result.plan.precision(c.name) in (s.low_of(c), s.high_of(c)), c.name
    assert result.plan.precision("lm_head") == s.high_of("lm_head")
    assert result.study.user_attrs[SETTINGS_ATTR]["low"] == LOW
    formats = {result.plan.weight_format(m).name for m in graph.matmuls if m.has_weight}
    assert "q4_k" in formats or "q6_k" in formats  # the k-quants are searched where they fit


def test_the_command_line_takes_preference_lists_and_checks_every_candidate():
    from types import SimpleNamespace

    from mpqc.cli import build_parser
    from mpqc.cli.validate import search_settings
    from mpqc.search import SearchConfig

    args = build_parser().parse_args(["search", "--target", "llama.cpp", "--low", LOW, "--high", HIGH])
    assert (args.low, args.high) == (LOW, HIGH)
    config = SearchConfig(budget=Budget("bits", 6.5), low=args.low, high=args.high, target="llama.cpp")
    search_settings(config, SimpleNamespace())  # every candidate's format and block size pass
    with pytest.raises(ValueError, match="unknown format .q9_9."):
        search_settings(config.replace(low="q4_k,q9_9"), SimpleNamespace())
