"""Law 2 as the paper fits it: asked ratios up to 0.95, points above 100% delta_ppl dropped,
per-vector and per-tensor blocks on the block-size axis at their average element count."""

from __future__ import annotations

import math

import pytest
from tiny_models import captured
from torch import nn

import mpqc
from mpqc.formats import get_format
from mpqc.studies.report import analysis

A, K = 0.002, 0.45  # the planted law: delta_ppl = A * block ** K


def linears(model) -> list[tuple[int, int]]:
    """(elements, rows) of each nn.Linear weight: a per-vector scale per row (its reduction axis)."""
    return [(m.weight.numel(), m.weight.shape[0]) for m in model.modules() if isinstance(m, nn.Linear)]


def test_elements_per_scale_by_a_hand_count():
    model, graph = captured("llama")
    weights = linears(model)  # 7 per layer and the lm_head: all matmul weights of the tiny llama
    elements = sum(n for n, _ in weights)
    assert elements == graph.total_params == 81920
    vector = mpqc.Plan.uniform(graph, "fp4_e2m1", activations=False)  # fp4_e2m1's default block: per vector
    assert vector.elements_per_scale() == elements / sum(rows for _, rows in weights)
    tensor = mpqc.Plan.uniform(graph, "fp4_e2m1", activations=False, block_size="tensor")
    assert tensor.elements_per_scale() == elements / len(weights)
    assert mpqc.Plan.uniform(graph, "mxint4").elements_per_scale() == 32.0  # every reduction axis is 64 or 128
    assert math.isnan(mpqc.Plan.uniform(graph, "bf16").elements_per_scale())  # nothing low: no scales
    # only the low weights count: the lm_head (128 x 64, kept high) is out
    kept = mpqc.Plan(graph, {}, default="bf16", keep_high=("lm_head",)).replace(
        {c.name: "fp4_e2m1" for c in graph.components("matmul") if c.name != "lm_head"}
    )
    head = model.lm_head.weight
    assert kept.elements_per_scale() == (elements - head.numel()) / (sum(rows for _, rows in weights) - head.shape[0])
    assert get_format("fp4_e2m1").n_blocks((10, 64), axis=1) == 10 and get_format("bf16").n_blocks((10, 64)) == 0


def row(block, delta, *, ratio=0.9, elements=None, seed=0, model="m"):
    return {
        "model": model,
        "params": 1000,
        "granularity": "matmul",
        "low": "mxint4",
        "weights_only": False,
        "ratio": ratio,
        "q_r_definition": "params of matmuls excluding kept-high: lm_head",
        "block_size": block,
        "block_elements": float(block) if elements is None and isinstance(block, int) else elements,
        "delta_ppl": delta,
        "seed": seed,
    }


def law(x):
    return A * x**K


def test_law2_fits_per_vector_and_per_tensor_at_their_element_counts():
    rows = [row(b, law(b)) for b in (16, 32, 64, 128)]
    rows += [row("vector", law(1536.0), elements=1536.0), row("tensor", law(40000.0), elements=40000.0)]
    (entry,) = analysis.law2_fits(rows)
    assert entry["fit"]["n"] == 6 and entry["note"] == ""
    assert entry["fit"]["k"] == pytest.approx(K, rel=1e-9) and entry["fit"]["A"] == pytest.approx(A, rel=1e-9)
    placed = {p["block_size"]: p["x"] for p in entry["points"]}
    assert placed == {16: 16.0, 32: 32.0, 64: 64.0, 128: 128.0, "vector": 1536.0, "tensor": 40000.0}


def test_law2_drops_points_above_100_percent_and_ratios_above_095():
    rows = [row(b, law(b)) for b in (16, 32, 64, 128)]
    rows.append(row(256, 1.5))  # +150%: dropped, or it would bend the fit
    rows += [row(b, law(b) * 3, ratio=1.0) for b in (16, 32, 64, 128)]  # at Q_r 1.0: never fitted
    rows += [row(b, law(b), ratio=0.95) for b in (16, 32, 64)]  # 0.95 itself is in
    fits = {e["ratio"]: e for e in analysis.law2_fits(rows)}
    assert fits[0.9]["fit"]["n"] == 4 and fits[0.9]["fit"]["k"] == pytest.approx(K, rel=1e-9)
    assert "1 point(s) left out: delta_ppl above 100%" in fits[0.9]["note"]
    assert [p["left_out"] for p in fits[0.9]["points"]].count(None) == 4
    assert fits[1.0]["fit"] is None and "Q_r 1 is above 0.95" in fits[1.0]["note"]
    assert fits[0.95]["fit"]["k"] == pytest.approx(K, rel=1e-9)
    # exactly 100% stays in (the paper drops points above it)
    (edge,) = analysis.law2_fits([row(b, law(b)) for b in (16, 32)] + [row(64, 1.0)])
    assert edge["fit"]["n"] == 3


def test_law2_without_element_counts_leaves_per_vector_out_and_says_so():
    # results written before block_elements existed: per-vector rows have no place on the axis
    rows = [row(b, law(b)) for b in (16, 32, 64)] + [row("vector", law(1536.0), elements=math.nan)]
    (entry,) = analysis.law2_fits(rows)
    assert entry["fit"]["n"] == 3 and "1 point(s) left out: no element count" in entry["note"]
    (few,) = analysis.law2_fits([row(16, law(16)), row(32, -0.01), row(64, law(64))])
    assert few["fit"] is None and "delta_ppl <= 0" in few["note"] and "fewer than 3 block sizes" in few["note"]


def test_law2_per_size_gathers_the_sizes_models_and_fits_their_points_together():
    rows = []
    for m, k in (("m-t0", 0.40), ("m-t1", 0.50)):  # two training seeds of one size, each its own k
        rows += [{**row(b, A * b**k), "model": m} for b in (16, 32, 64, 128)]
    rows += [{**row(b, law(b)), "model": "other", "params": 5000} for b in (16, 32, 64)]  # one model: no pooling
    fits = analysis.law2_fits(rows)
    (size,) = [e for e in analysis.law2_by_size(fits) if e["params"] == 1000]
    assert size["models"] == ["m-t0", "m-t1"] and size["k"] == pytest.approx([0.40, 0.50], rel=1e-9)
    assert size["k_mean"] == pytest.approx(0.45) and (size["k_min"], size["k_max"]) == pytest.approx((0.40, 0.50))
    # the pooled line through both seeds' 8 points: between the two slopes, with a standard error
    assert 0.40 < size["pooled"]["k"] < 0.50 and size["pooled"]["n"] == 8 and size["pooled"]["k_err"] > 0
    (alone,) = [e for e in analysis.law2_by_size(fits) if e["params"] == 5000]
    assert alone["pooled"] is None and alone["k"] == pytest.approx([K], rel=1e-9)


def test_a_block_longer_than_the_rows_sits_at_the_elements_it_really_shares():
    # rows of 64: a 512 block is one scale per row, as per-vector is; the nominal 512 would fake a slope
    rows = [row(b, law(b)) for b in (16, 32)] + [row(64, law(64)), row(512, law(64), elements=64.0)]
    (entry,) = analysis.law2_fits(rows)
    assert {p["block_size"]: p["x"] for p in entry["points"]} == {16: 16.0, 32: 32.0, 64: 64.0, 512: 64.0}
    assert entry["fit"]["k"] == pytest.approx(K, rel=1e-9) and entry["fit"]["n"] == 3  # 64 and 512: one point
    legacy = {**row(128, law(128)), "block_elements": math.nan}  # results written before block_elements
    assert analysis.law2_position(legacy) == 128.0
