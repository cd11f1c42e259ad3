"""Q_r as the paper defines it: components kept high are left out of Q_r (numerator and denominator),
and every plan, result and export says which definition its Q_r follows."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import captured

import mpqc
from mpqc.plan import Q_R_ALL, q_r_definition, resolve_keep_high

TOKENS = torch.randint(0, 128, (8000,), generator=torch.Generator().manual_seed(0))
FAST = dict(seq_len=16, n_samples=2, progress=False)
EXCLUDING_HEAD = "params of matmuls excluding kept-high: lm_head"


def hand_counts(model) -> dict[str, int]:
    """Weight elements of each decoder layer's linears and of the lm_head, from the HF model itself."""
    counts = {"lm_head": model.lm_head.weight.numel()}
    for i in range(model.config.num_hidden_layers):
        counts[f"layers.{i}"] = sum(
            p.numel() for n, p in model.named_parameters() if n.startswith(f"model.layers.{i}.") and p.dim() == 2
        )
    return counts


def test_kept_high_components_leave_q_r_by_a_hand_count():
    model, graph = captured("llama")
    n = hand_counts(model)
    assert (n["layers.0"], n["layers.1"], n["lm_head"]) == (36864, 36864, 8192)  # hidden 64, mlp 128, vocab 128
    plan = mpqc.Plan(graph, {"layers.0": "mxint4"}, default="bf16", granularity="layer")
    kept = mpqc.Plan(graph, {"layers.0": "mxint4"}, default="bf16", granularity="layer", keep_high=("lm_head",))
    assert plan.quantization_ratio() == n["layers.0"] / (n["layers.0"] + n["layers.1"] + n["lm_head"])
    # layer-wise Q_r over the decoder layers only: one of two equal layers is low
    assert kept.quantization_ratio() == n["layers.0"] / (n["layers.0"] + n["layers.1"]) == 0.5
    assert plan.q_r_definition == Q_R_ALL == "params of all matmuls"
    assert kept.q_r_definition == EXCLUDING_HEAD
    assert kept.summary()["q_r_definition"] == EXCLUDING_HEAD
    assert kept.average_bits() == plan.average_bits()  # bits still count every matmul weight
    # by MACs the kept-high lm_head leaves both counts too
    macs = {m.name: m.macs_per_token for m in graph.matmuls}
    low_macs = sum(v for k, v in macs.items() if k.startswith("layers.0."))
    assert kept.quantization_ratio("macs") == low_macs / (sum(macs.values()) - macs["lm_head"])


def test_matmul_granularity_and_roles():
    model, graph = captured("llama")
    n = hand_counts(model)
    down = [f"layers.{i}.mlp.down_proj" for i in range(2)]
    plan = mpqc.Plan(graph, {d: "mxint4" for d in down}, keep_high=("lm_head",))
    assert plan.quantization_ratio() == 2 * 8192 / (n["layers.0"] + n["layers.1"])
    # a role names every component whose matmuls all have it
    assert resolve_keep_high(graph, "matmul", ["down_proj"]) == tuple(down)
    by_role = mpqc.Plan(graph, {}, keep_high=("down_proj", "lm_head"))
    assert by_role.kept_high == (*down, "lm_head")
    assert by_role.q_r_definition == q_r_definition(("down_proj", "lm_head"))
    # at layer granularity the lm_head is a component of its own (outside the decoder layers)
    assert resolve_keep_high(graph, "layer", ["lm_head"]) == ("lm_head",)


def test_keep_high_errors_name_the_problem():
    _, graph = captured("llama")
    with pytest.raises(ValueError, match="'lm_haed'.*closest: lm_head.*nor a role"):
        mpqc.Plan(graph, {}, keep_high=("lm_haed",))
    with pytest.raises(ValueError, match="role 'q_proj' is no whole component"):
        mpqc.Plan(graph, {}, granularity="layer", keep_high=("q_proj",))
    with pytest.raises(TypeError, match="list of component names or roles"):
        mpqc.Plan(graph, {}, keep_high="lm_head")
    with pytest.raises(ValueError, match=r"kept high.*assigned another precision"):
        mpqc.Plan(graph, {"lm_head": "mxint4"}, keep_high=("lm_head",))
    with pytest.raises(TypeError, match="list of component names"):
        mpqc.search.SearchConfig(budget=("params", 0.5), keep_high="lm_head")


def test_a_uniform_plan_keeps_its_kept_high_components_high():
    _, graph = captured("llama")
    plan = mpqc.Plan.uniform(graph, "int3", granularity="layer", keep_high=("lm_head",))
    assert str(plan.precision("lm_head")) == "bf16" and plan.quantization_ratio() == 1.0
    assert {str(plan.precision(f"layers.{i}")) for i in range(2)} == {"int3"}
    both = mpqc.Plan.uniform(graph, "int3", keep_high=("lm_head",))  # matmul-wise: the same matmuls low
    assert [str(both.precision_of(m)) for m in graph.matmuls] == [str(plan.precision_of(m)) for m in graph.matmuls]
    # the kept-high components sit at a plan's default: q8_0 is the high of a llama.cpp search
    gguf = mpqc.Plan.uniform(graph, "q4_0", keep_high=("lm_head",), high="q8_0", activations=False)
    assert str(gguf.precision("lm_head").weight.name) == "q8_0" and gguf.quantization_ratio() == 1.0


def test_plan_json_keeps_the_definition():
    _, graph = captured("llama")
    plan = mpqc.Plan(graph, {"layers.0": "mxint4"}, granularity="layer", keep_high=("lm_head",))
    data = json.loads(plan.to_json())
    assert data["keep_high"] == ["lm_head"] and data["summary"]["q_r_definition"] == EXCLUDING_HEAD
    again = mpqc.Plan.from_json(graph, plan.to_json())
    assert again == plan and again.quantization_ratio() == 0.5
    # a plan file written before keep_high existed: Q_r over all matmuls, as it was
    old = json.loads(mpqc.Plan(graph, {"layers.0": "mxint4"}, granularity="layer").to_json())
    del old["summary"]["q_r_definition"]
    assert mpqc.Plan.from_dict(graph, old).q_r_definition == Q_R_ALL
    data["summary"]["q_r_definition"] = Q_R_ALL
    with pytest.raises(ValueError, match="defines Q_r as 'params of all matmuls' but its keep_high"):
        mpqc.Plan.from_dict(graph, data)
    assert not mpqc.Plan(graph, {}) != mpqc.Plan(graph, {}, keep_high=())
    assert mpqc.Plan(graph, {}) != mpqc.Plan(graph, {}, keep_high=("lm_head",))


def test_search_with_keep_high_budgets_the_searchable_share(tmp_path):
    model, graph = captured("llama")
    n = hand_counts(model)
    result = mpqc.search.run(
        graph, TOKENS, ratio=0.5, granularity="layer", keep_high=("lm_head",), sampler="random", n_trials=3, **FAST
    )
    low = [c for c in ("layers.0", "layers.1") if result.plan.precision(c).is_low]
    assert not result.plan.precision("lm_head").is_low
    assert result.achieved == sum(n[c] for c in low) / (n["layers.0"] + n["layers.1"]) >= 0.5
    for t in result.study.trials:  # every trial's recorded Q_r follows the same definition
        assert t.user_attrs["q_r_definition"] == EXCLUDING_HEAD
    paths = mpqc.search.write_outputs(result, str(tmp_path))
    written = json.loads(open(paths["result"]).read())
    assert written["q_r_definition"] == EXCLUDING_HEAD and written["keep_high"] == ["lm_head"]
    assert written["plan"]["summary"]["q_r_definition"] == EXCLUDING_HEAD
    # without keep_high the lm_head is a component of Q_r, as before
    plain = mpqc.search.run(graph, TOKENS, ratio=0.5, granularity="layer", sampler="random", n_trials=3, **FAST)
    assert plain.to_dict()["q_r_definition"] == Q_R_ALL


def test_budget_sizes_are_shares_of_the_searchable_parameters():
    model, graph = captured("llama")
    n = hand_counts(model)
    low, high = mpqc.search.budget.search_precisions("mxint4", "bf16", weights_only=False)
    space = mpqc.search.SearchSpace(
        graph, "matmul", low, high, mpqc.search.Budget("params", 0.5), keep_high=("lm_head",)
    )
    sizes = space.sizes()
    assert "lm_head" not in sizes and sum(sizes.values()) == pytest.approx(1.0, abs=1e-12)  # float sum of shares
    assert sizes["layers.0.mlp.down_proj"] == 8192 / (n["layers.0"] + n["layers.1"])
    assert space.reachable() == (0.0, 1.0)
    everything = [c.name for c in graph.components("matmul")]
    with pytest.raises(ValueError, match="counts nothing"):
        mpqc.search.SearchSpace(
            graph, "matmul", low, high, mpqc.search.Budget("params", 0.5), keep_high=everything
        ).sizes()


def test_onnx_metadata_states_the_definition(tmp_path):
    import onnx

    from mpqc.export import read_metadata, to_onnx

    _, graph = captured("llama")
    plan = mpqc.Plan(graph, {"layers.0": "mxint4"}, granularity="layer", keep_high=("lm_head",))
    path = tmp_path / "kept.onnx"
    to_onnx(mpqc.compile(graph, plan), path)
    meta = read_metadata(path)
    assert meta["q_r_definition"] == EXCLUDING_HEAD and meta["quantization_ratio"] == 0.5
    # a file written before the key existed reads as Q_r over all matmuls
    proto = onnx.load(str(path), load_external_data=False)
    kept = [p for p in proto.metadata_props if p.key != "mpqc.q_r_definition"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    assert read_metadata(proto)["q_r_definition"] == Q_R_ALL


def test_search_command_line_takes_keep_high():
    from mpqc.cli import build_parser
    from mpqc.cli.search import _config

    args = build_parser().parse_args(["search", "m", "--keep-high", "lm_head, down_proj"])
    assert _config(args, None, ()).keep_high == ("lm_head", "down_proj")
    assert _config(build_parser().parse_args(["search", "m"]), None, ()).keep_high == ()
