"""Analysis passes and mpqc.graph: matmuls found, roles, layers, costs, reduction axes, components."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import (
    ARCH_ATTN,
    EXAMPLE_SHAPE,
    EXPERTS,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    LAYERS,
    TOP_K,
    VOCAB,
    Attention,
    SharedWeightLM,
    captured,
    example_ids,
)

from mpqc.capture import capture
from mpqc.graph import GRANULARITIES, MATMUL_META_KEYS, ROLES, Component, group_components
from mpqc.passes.analysis import (
    AnalysisError,
    AssignRoles,
    FindMatmuls,
    analysis_passes,
)
from mpqc.passes.transform.decompose_attention import DecomposeAttention

SEQ = EXAMPLE_SHAPE[1]
INTERMEDIATE = 2 * HIDDEN
ATTENTION = ["attention_scores", "attention_values"]
LLAMA_LAYER = ["q_proj", "k_proj", "v_proj", *ATTENTION, "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_expected():
    names = {
        "q_proj": "self_attn.q_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.o_proj",
        "gate_proj": "mlp.gate_proj",
        "up_proj": "mlp.up_proj",
        "down_proj": "mlp.down_proj",
        "attention_scores": "attention_scores",
        "attention_values": "attention_values",
    }
    rows = [(f"layers.{i}.{names[r]}", r, i) for i in range(LAYERS) for r in LLAMA_LAYER]
    return [*rows, ("lm_head", "lm_head", None)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_names_roles_and_layers(attn):
    _, graph = captured("llama", attn)
    assert [(m.name, m.role, m.layer) for m in graph.matmuls] == llama_expected()


# Roles of layer 0, in graph order, then the matmuls outside the layers.
EXPECTED_LAYER_ROLES = {
    "qwen2": LLAMA_LAYER,
    "qwen3": LLAMA_LAYER,
    "mistral": LLAMA_LAYER,
    "gemma2": LLAMA_LAYER,
    "gemma3_text": LLAMA_LAYER,
    "phi3": ["qkv_proj", *ATTENTION, "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["qkv_proj", *ATTENTION, "o_proj", "up_proj", "down_proj"],
    "gpt_neox": ["qkv_proj", *ATTENTION, "o_proj", "up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", *ATTENTION, "o_proj", "up_proj", "down_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", *ATTENTION, "o_proj", "router", "expert", "expert"],
}


@pytest.mark.parametrize("arch,attn", [(a, t) for a, t in ARCH_ATTN if a in EXPECTED_LAYER_ROLES])
def test_roles_per_architecture(arch, attn):
    _, graph = captured(arch, attn)
    for layer in range(LAYERS):
        assert [m.role for m in graph.matmuls if m.layer == layer] == EXPECTED_LAYER_ROLES[arch]
    assert [(m.name, m.role) for m in graph.matmuls if m.layer is None] == [("lm_head", "lm_head")]
    assert {m.role for m in graph.matmuls} <= set(ROLES)


def test_gpt2_conv1d_names_and_ops():
    _, graph = captured("gpt2", "sdpa")
    layer0 = [(m.name, m.op) for m in graph.matmuls if m.layer == 0]
    assert layer0 == [
        ("h.0.attn.c_attn", "aten.addmm.default"),
        ("h.0.attention_scores", "aten.matmul.default"),
        ("h.0.attention_values", "aten.matmul.default"),
        ("h.0.attn.c_proj", "aten.addmm.default"),
        ("h.0.mlp.c_fc", "aten.addmm.default"),
        ("h.0.mlp.c_proj", "aten.addmm.default"),
    ]


@pytest.mark.parametrize("arch,attn", ARCH_ATTN)
def test_layer_paths_end_in_the_layer_index(arch, attn):
    _, graph = captured(arch, attn)
    for m in graph.matmuls:
        if m.layer is None:
            assert m.layer_path is None
        else:
            assert m.layer_path.endswith(f".{m.layer}")
    assert graph.num_layers == LAYERS


# ---- components ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch,attn", ARCH_ATTN)
def test_layer_components_are_the_layers_plus_one_per_outside_matmul(arch, attn):
    _, graph = captured(arch, attn)
    outside = [m for m in graph.matmuls if m.layer is None]
    components = graph.components("layer")
    assert len(components) == LAYERS + len(outside)
    for i in range(LAYERS):
        members = [m for m in graph.matmuls if m.layer == i]
        (component,) = [c for c in components if c.layer == i]
        assert component.matmuls == tuple(members)
        assert component.granularity == "layer"
    assert [c.name for c in components if c.layer is None] == [m.name for m in outside]
    assert sum(c.params for c in components) == graph.total_params
    assert sum(c.macs for c in components) == graph.total_macs_per_token


def test_layer_component_names():
    _, llama = captured("llama", "sdpa")
    assert [c.name for c in llama.components("layer")] == ["layers.0", "layers.1", "lm_head"]
    _, gpt2 = captured("gpt2", "sdpa")
    assert [c.name for c in gpt2.components("layer")] == ["h.0", "h.1", "lm_head"]


def test_matmul_components_are_single_matmuls():
    _, graph = captured("mixtral", "sdpa")
    components = graph.components("matmul")
    assert [c.name for c in components] == [m.name for m in graph.matmuls]
    assert all(len(c.matmuls) == 1 and c.params == c.matmuls[0].params for c in components)


def test_callable_granularity_groups_by_its_result():
    _, graph = captured("llama", "sdpa")

    def by_kind(m):
        return "attention" if m.role.startswith("attention_") else "weights"

    components = graph.components(by_kind)
    assert [c.name for c in components] == ["weights", "attention"]
    assert components[0].granularity == "custom:by_kind"
    assert components[1].params == 0 and len(components[1].matmuls) == 2 * LAYERS
    assert components[0].layer is None  # members span layers
    per_layer = graph.components(lambda m: f"block{m.layer}")
    assert [c.layer for c in per_layer] == [0, 1, None]


def test_bad_granularity_errors_name_the_valid_ones():
    _, graph = captured("llama", "sdpa")
    with pytest.raises(ValueError, match="'matmul', 'layer'"):
        graph.components("block")
    with pytest.raises(TypeError, match="must return a non-empty group name"):
        graph.components(lambda m: None)
    with pytest.raises(ValueError, match="no matmuls"):
        Component("empty", "matmul", None, ())
    assert group_components(graph.matmuls, "layer") == graph.components("layer")
    assert GRANULARITIES == ("matmul", "layer")


# ---- costs ------------------------------------------------------------------------------


def test_llama_params_and_macs_per_token():
    _, graph = captured("llama", "sdpa")
    by_name = {m.name: m for m in graph.matmuls}
    assert by_name["layers.0.self_attn.q_proj"].params == HIDDEN * HIDDEN
    assert by_name["layers.0.self_attn.k_proj"].macs_per_token == (HIDDEN // 2) * HIDDEN  # 2 kv heads of 16
    assert by_name["layers.1.mlp.down_proj"].macs_per_token == HIDDEN * INTERMEDIATE
    assert by_name["lm_head"].params == by_name["lm_head"].macs_per_token == VOCAB * HIDDEN
    for role in ATTENTION:
        m = by_name[f"layers.0.{role}"]
        # Dense count at the reference length: heads * seq * head_dim per token.
        assert (m.params, m.macs_per_token, m.reference_seq_len) == (0, HEADS * SEQ * HEAD_DIM, SEQ)
    assert graph.reference_seq_len == SEQ


@pytest.mark.parametrize("arch", ["gpt2", "gemma3_text", "opt"])
def test_tied_lm_head_owns_the_embedding_once(arch):
    model, graph = captured(arch, "sdpa")
    assert model.lm_head.weight is model.get_input_embeddings().weight
    (head,) = [m for m in graph.matmuls if m.role == "lm_head"]
    assert head.params == VOCAB * HIDDEN and head.shares_weight_with is None


def test_a_weight_shared_by_two_matmuls_counts_once():
    model = SharedWeightLM().eval()
    graph = capture(model, (example_ids(),))
    assert [(m.name, m.role, m.params, m.shares_weight_with) for m in graph.matmuls] == [
        ("layers.0.shared", "other", HIDDEN * HIDDEN, None),
        ("layers.0.shared#1", "other", 0, "layers.0.shared"),
        ("layers.1.shared", "other", HIDDEN * HIDDEN, None),
        ("layers.1.shared#1", "other", 0, "layers.1.shared"),
        # F.linear(h, embed.weight) outside any lm_head module is still the head.
        ("lm_head", "lm_head", VOCAB * HIDDEN, None),
    ]
    assert graph.total_params == 2 * HIDDEN * HIDDEN + VOCAB * HIDDEN
    assert all(m.macs_per_token == HIDDEN * HIDDEN for m in graph.matmuls[:4])
    ids = example_ids((3, 5), seed=2)
    torch.testing.assert_close(graph.module(ids), model(ids)[0], atol=0, rtol=0)


@pytest.mark.parametrize(
    "experts, op", [(None, "transformers.grouped_mm_fallback.default"), ("batched_mm", "aten.bmm.default")]
)
def test_mixtral_expert_matmuls(experts, op):
    _, graph = captured("mixtral", "sdpa", experts)
    experts_mm = [m for m in graph.matmuls if m.role == "expert"]
    assert [m.name for m in experts_mm] == [
        f"layers.{i}.mlp.experts.{p}" for i in range(LAYERS) for p in ("gate_up_proj", "down_proj")
    ]
    gate_up, down = experts_mm[:2]
    assert gate_up.op == down.op == op
    assert gate_up.weight_shape == (EXPERTS, 2 * INTERMEDIATE, HIDDEN)
    assert gate_up.params == EXPERTS * 2 * INTERMEDIATE * HIDDEN
    assert down.params == EXPERTS * HIDDEN * INTERMEDIATE
    # Each token runs through top_k experts.
    assert gate_up.macs_per_token == TOP_K * 2 * INTERMEDIATE * HIDDEN
    assert down.macs_per_token == TOP_K * HIDDEN * INTERMEDIATE
    # Both forms reduce over the expert weight's last (input) axis.
    assert gate_up.weight_reduction_axis == down.weight_reduction_axis == 2
    nodes = {n.name: n for n in graph.module.graph.nodes}
    path_ops = [str(nodes[name].target) for name in gate_up.weight_path[1:]]
    if op == "aten.bmm.default":  # bmm(weights[expert_ids] [S, out, in], x [S, in, 1])
        assert (gate_up.weight_operand, gate_up.reduction_axes) == (0, (2, -2))
        assert path_ops == ["aten.index.Tensor"]
    else:  # grouped_mm(x [S, in], weights.transpose(-2, -1) [E, in, out], offsets)
        assert (gate_up.weight_operand, gate_up.reduction_axes) == (1, (-1, 1))
        assert path_ops == ["aten.transpose.int"]
    router = graph.matmul("layers.0.mlp.gate")
    assert (router.role, router.params, router.macs_per_token) == ("router", EXPERTS * HIDDEN, EXPERTS * HIDDEN)


# ---- reduction axes and the meta schema ------------------------------------------------


def test_reduction_axes_of_linear_and_attention_operands():
    _, graph = captured("llama", "sdpa")
    q = graph.matmul("layers.0.self_attn.q_proj")
    assert (q.operands, q.reduction_axes, q.weight_operand, q.weight_reduction_axis) == ((0, 1), (-1, 1), 1, 1)
    scores = graph.matmul("layers.0.attention_scores")
    values = graph.matmul("layers.0.attention_values")
    # Q [.., seq, head_dim] @ K^T [.., head_dim, seq]: both along head_dim.
    assert (scores.reduction_axes, scores.weight, scores.weight_operand) == ((-1, -2), None, None)
    # P [.., seq, seq] @ V [.., seq, head_dim]: along the key positions.
    assert values.reduction_axes == (-1, -2)
    k_t = graph.node(scores).args[1]
    assert k_t.meta["val"].shape[-2] == HEAD_DIM


def test_gpt2_conv1d_weight_reduces_along_its_first_axis():
    _, graph = captured("gpt2", "sdpa")
    c_attn = graph.matmul("h.0.attn.c_attn")  # addmm(bias, x, W[in, out])
    assert (c_attn.operands, c_attn.reduction_axes) == ((1, 2), (-1, 0))
    assert (c_attn.weight, c_attn.weight_shape, c_attn.weight_reduction_axis) == (
        "transformer.h.0.attn.c_attn.weight",
        (HIDDEN, 3 * HIDDEN),
        0,
    )


def test_weight_used_transposed_maps_axis_back_to_the_parameter():
    graph = capture(SharedWeightLM().eval(), (example_ids(),))
    m = graph.matmul("layers.0.shared")  # x @ shared.t()
    assert (m.reduction_axes, m.weight, m.weight_reduction_axis) == ((-1, 0), "layers.0.shared", 1)


@pytest.mark.parametrize("arch,attn", ARCH_ATTN)
def test_operands_agree_on_the_reduced_size(arch, attn):
    _, graph = captured(arch, attn)
    for m in graph.matmuls:
        node = graph.node(m)
        # Sizes may be symbolic (attention's P @ V reduces over the sequence): compare as text.
        sizes = {str(node.args[i].meta["val"].shape[axis]) for i, axis in zip(m.operands, m.reduction_axes)}
        if m.weight is not None:
            weight = graph.module.get_parameter(m.weight)
            assert tuple(weight.shape) == m.weight_shape
            sizes.add(str(weight.shape[m.weight_reduction_axis]))
        assert len(sizes) == 1, (m.name, sizes)


@pytest.mark.parametrize("arch,attn", ARCH_ATTN)
def test_matmul_node_meta_is_complete(arch, attn):
    _, graph = captured(arch, attn)
    marked = [n for n in graph.module.graph.nodes if n.meta.get("mpqc", {}).get("matmul")]
    assert [n.name for n in marked] == [m.node for m in graph.matmuls]
    for m in graph.matmuls:
        meta = graph.node(m).meta["mpqc"]
        assert set(MATMUL_META_KEYS) <= set(meta)
        assert (meta["name"], meta["role"], meta["layer"], meta["weight"], meta["params"]) == (
            m.name,
            m.role,
            m.layer,
            m.weight,
            m.params,
        )
        assert meta["components"] == {"matmul": m.name, "layer": m.component("layer")}
        if m.weight is None:
            assert m.weight_path is None and m.weight_operand is None
        else:  # get_attr of the weight, layout ops, ..., the operand the matmul reads
            nodes = {n.name: n for n in graph.module.graph.nodes}
            first, last = nodes[m.weight_path[0]], nodes[m.weight_path[-1]]
            assert (first.op, first.target) == ("get_attr", m.weight)
            assert last is graph.node(m).args[m.weight_operand]


def test_graph_summary_and_dict():
    _, graph = captured("phi3", "sdpa")
    text = graph.summary()
    assert "layers.0.self_attn.qkv_proj" in text and "gate_up_proj" in text
    assert f"{graph.total_params:,}" in text.splitlines()[-1]
    assert repr(graph).startswith("Graph(Phi3ForCausalLM, matmuls=13, layers=2")
    data = json.loads(json.dumps(graph.to_dict()))
    assert data["total_params"] == graph.total_params and len(data["matmuls"]) == len(graph.matmuls)
    with pytest.raises(KeyError, match="names containing it"):
        graph.matmul("qkv_proj")


# ---- pass contracts ---------------------------------------------------------------------


def _fresh_graph_module():
    ep = torch.export.export(SharedWeightLM().eval(), (example_ids(),), strict=False)
    return ep.module(check_guards=False)


def test_analysis_passes_annotate_without_rewriting():
    gm = _fresh_graph_module()
    code, names = gm.code, [n.name for n in gm.graph.nodes]
    for p in analysis_passes():
        assert p(gm).modified is False
    assert gm.code == code and [n.name for n in gm.graph.nodes] == names
    annotated = {n.name for n in gm.graph.nodes if "mpqc" in n.meta}
    assert annotated == {n.name for n in gm.graph.nodes if n.meta.get("mpqc", {}).get("matmul")}


def test_passes_check_that_earlier_passes_ran():
    gm = _fresh_graph_module()
    with pytest.raises(AnalysisError, match="run FindMatmuls first"):
        AssignRoles()(gm)
    FindMatmuls()(gm)
    with pytest.raises(AnalysisError, match=r"needs meta\['mpqc'\] keys \['layer'\]"):
        AssignRoles()(gm)


def test_find_matmuls_requires_attention_to_be_decomposed():
    q = k = v = torch.randn(1, 2, 4, 8)
    gm = torch.export.export(Attention(), (q, k, v), strict=False).module(check_guards=False)
    with pytest.raises(AnalysisError, match="run DecomposeAttention first"):
        FindMatmuls()(gm)
    DecomposeAttention()(gm)
    for p in analysis_passes()[:3]:  # FindMatmuls, AssignLayers, AssignRoles: no input_ids here for costs
        p(gm)
    roles = [n.meta["mpqc"]["role"] for n in gm.graph.nodes if n.meta.get("mpqc", {}).get("matmul")]
    assert roles == ATTENTION
