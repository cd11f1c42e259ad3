"""mpqc.compile and mpqc.Plan on tiny models of every architecture family."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import ARCHS, SDPA_UNSUPPORTED, example_ids, hand_count_matmul_params
from tiny_models import captured as captured_with
from torch import nn
from transformers.pytorch_utils import Conv1D

import mpqc
from mpqc.formats import quantize


def captured(arch):
    return captured_with(arch, "eager" if arch in SDPA_UNSUPPORTED else "sdpa")


# The captured graph decomposes fused attention and reorders a few float ops, so it agrees
# with the eager model to float32 rounding only (see test_capture); against the captured
# graph itself the comparisons below are exact.
ATOL, RTOL = 1e-5, 1e-4


def new_ids():
    return example_ids((3, 11), seed=7)  # a batch size and length other than the capture's


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_plan_reproduces_the_model(arch):
    model, graph = captured(arch)
    ids = new_ids()
    qmodel = mpqc.compile(graph, mpqc.Plan.uniform(graph, "fp32"))
    assert torch.equal(qmodel(ids), graph.module(ids))
    with torch.no_grad():
        torch.testing.assert_close(qmodel(ids), model(ids, use_cache=False).logits, atol=ATOL, rtol=RTOL)


def hand_quantized_copy(model: nn.Module, graph, fmt: str) -> nn.Module:
    """The model with every matmul weight quantized by hand along its input (reduction) axis.

    nn.Linear weights are [out, in] (axis 1), GPT-2's Conv1D [in, out] (axis 0); other
    weights (stacked MoE experts) take the axis the graph recorded. A head tied to the
    embedding is untied first, since the lookup keeps the float embedding."""
    clone = copy.deepcopy(model)
    head = clone.get_output_embeddings()
    if head is not None and head.weight is clone.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
    axes = {}
    for name, mod in clone.named_modules():
        if isinstance(mod, nn.Linear):
            axes[f"{name}.weight"] = 1
        elif isinstance(mod, Conv1D):
            axes[f"{name}.weight"] = 0
    for m in graph.matmuls:
        if m.has_weight:
            axes.setdefault(m.weight, m.weight_reduction_axis)
    params = dict(clone.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, axis in axes.items():
            if name in params:
                params[name].copy_(quantize(params[name], fmt, axis=axis))
    return clone


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_only_equals_hand_quantized_model(arch):
    model, graph = captured(arch)
    ids = new_ids()
    plan = mpqc.Plan.uniform(graph, "mxint4", activations=False, high="fp32")
    qmodel = mpqc.compile(graph, plan)
    with torch.no_grad():
        expected = hand_quantized_copy(model, graph, "mxint4")(ids, use_cache=False).logits
    got = qmodel(ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(got, graph.module(ids), atol=1e-3)  # quantization did happen


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_and_activations_run_on_new_shapes_and_set_plan_round_trips(arch):
    _, graph = captured(arch)
    ids = new_ids()
    w4a4 = mpqc.Plan.uniform(graph, "mxint4")
    qmodel = mpqc.compile(graph, w4a4)
    a = qmodel(ids)
    assert a.shape == (3, 11, graph.module(ids).shape[-1]) and torch.isfinite(a).all()
    computed = qmodel.weight_cache.computed
    qmodel.set_plan(mpqc.Plan.uniform(graph, "mxfp4"))
    b = qmodel(ids)
    assert not torch.equal(a, b)
    qmodel.set_plan(w4a4)
    assert torch.equal(qmodel(ids), a)
    # Going back re-used the cached MXINT4 weights: only the MXFP4 ones were new.
    assert qmodel.weight_cache.computed == 2 * computed


def test_weight_only_differs_from_weights_and_activations():
    _, graph = captured("llama")
    ids = new_ids()
    q = mpqc.compile(graph, mpqc.Plan.uniform(graph, "mxint4", activations=False, high="fp32"))
    w_only = q(ids)
    q.set_plan(mpqc.Plan.uniform(graph, "mxint4"))
    assert not torch.equal(w_only, q(ids))


def test_activation_quantized_once_per_format_for_shared_inputs():
    _, graph = captured("llama")
    q = mpqc.compile(graph, mpqc.Plan.uniform(graph, "mxint4"))
    qkv = [aq for aq in q._inserted.activation_quantizers if len(aq.consumers) == 3]
    assert len(qkv) == 2  # one per layer: q, k and v projections read one normalized input
    assert {c.rsplit(".", 1)[-1] for c in qkv[0].consumers} == {"q_proj", "k_proj", "v_proj"}


def test_ratio_and_bits_accounting_equal_a_hand_count():
    model, graph = captured("llama")
    total = hand_count_matmul_params(model)
    layer0 = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.0.") and p.dim() == 2)
    head = model.lm_head.weight.numel()
    plan = mpqc.Plan(graph, {"layers.0": "bf16", "lm_head": "bf16"}, default="mxint4", granularity="layer")
    assert plan.quantization_ratio() == (total - layer0 - head) / total
    # MXINT4 at block 32: 4 bits + 8 bits per 32 elements = 4.25 bits; bf16: 16 bits.
    low = total - layer0 - head
    assert plan.average_bits() == (low * 4.25 + (layer0 + head) * 16) / total
    # By MACs: the attention matmuls of layer 1 are MXINT4 too (activation format); layer 0's are not.
    macs = {m.name: m.macs_per_token for m in graph.matmuls}
    high_macs = sum(v for k, v in macs.items() if k.startswith("layers.0.") or k == "lm_head")
    assert plan.quantization_ratio(by="macs") == (sum(macs.values()) - high_macs) / sum(macs.values())
    assert mpqc.Plan.uniform(graph, "mxfp4").average_bits() == 4.25
    assert mpqc.Plan.uniform(graph, "mxfp4", block_size=16).average_bits() == 4.5
    assert mpqc.Plan.uniform(graph, "bf16").quantization_ratio() == 0.0


def test_layer_components():
    _, graph = captured("llama")
    comps = graph.components("layer")
    assert [c.name for c in comps] == ["layers.0", "layers.1", "lm_head"]
    assert len(comps[0].matmuls) == 9  # q k v scores values o gate up down


def test_plan_json_round_trip_and_errors():
    _, graph = captured("qwen2")
    names = [c.name for c in graph.components("matmul")]
    plan = mpqc.Plan(
        graph,
        {names[0]: "bf16", names[1]: ("mxfp4", None), names[2]: {"weight": "mxint8", "activation": "mxfp8_e4m3"}},
        default="mxint4",
        block_size=64,
        rounding="even",
    )
    again = mpqc.Plan.from_json(graph, plan.to_json())
    assert again == plan and again.to_json() == plan.to_json()
    data = json.loads(plan.to_json())
    assert data["components"][names[1]] == {"weight": "mxfp4", "activation": None}
    assert data["summary"]["quantization_ratio_params"] == plan.quantization_ratio()
    with pytest.raises(KeyError, match="layers.0.self_attn.q_prj.*closest: layers.0.self_attn.q_proj"):
        mpqc.Plan(graph, {"layers.0.self_attn.q_prj": "bf16"})
    with pytest.raises(ValueError, match="unknown format 'mxint5'"):
        mpqc.Plan(graph, {}, default="mxint5")
    with pytest.raises(ValueError, match="block size must be"):
        mpqc.Plan.uniform(graph, "mxint4", block_size=0)
    other = captured("llama")[1]
    with pytest.raises(ValueError, match="another captured graph"):
        mpqc.compile(other, mpqc.Plan.uniform(other, "fp32")).set_plan(plan)


def test_compile_leaves_the_captured_graph_alone():
    _, graph = captured("gpt2")
    before = graph.module.code
    mpqc.compile(graph, mpqc.Plan.uniform(graph, "mxint4"))
    assert graph.module.code == before


def test_moe_batched_mm_experts_quantize_through_the_expert_gather():
    # With experts_implementation="batched_mm" each expert weight reaches its bmm through an
    # index (gather) of the stacked [experts, out, in] tensor; the quantizer sits before it.
    model, graph = captured_with("mixtral", "sdpa", "batched_mm")
    ids = new_ids()
    qmodel = mpqc.compile(graph, mpqc.Plan.uniform(graph, "mxint4", activations=False, high="fp32"))
    with torch.no_grad():
        expected = hand_quantized_copy(model, graph, "mxint4")(ids, use_cache=False).logits
    torch.testing.assert_close(qmodel(ids), expected, atol=ATOL, rtol=RTOL)
    assert any(m.role == "expert" and len(m.weight_shape) == 3 for m in graph.matmuls)


def test_bf16_model_captures_compiles_and_quantizes_in_bf16():
    """A model loaded in bf16 (the GPU setting) keeps bf16 through capture, compile and the quantizers."""
    from tiny_models import tiny_model

    model = tiny_model("llama").to(torch.bfloat16)
    graph = mpqc.capture(model, (example_ids(),))
    assert (graph.device, graph.dtype) == (torch.device("cpu"), torch.bfloat16)
    ids = new_ids()
    bf16 = mpqc.compile(graph, mpqc.Plan.uniform(graph, "bf16"))
    assert torch.equal(bf16(ids), graph.module(ids))  # bf16 on a bf16 model is no quantizer at all
    qmodel = mpqc.compile(graph, mpqc.Plan.uniform(graph, "mxint4"))
    out = qmodel(ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert not torch.equal(out, bf16(ids))
    # Each weight is the bf16 weight quantized by the same kernel, in bf16.
    for name, wq in qmodel.weight_quantizers.items():
        w = qmodel.module.get_parameter(wq.weight_name)
        expected = quantize(w.detach(), mpqc.formats.get_format("mxint4"), axis=wq.axis)
        assert wq(w).dtype == torch.bfloat16 and torch.equal(wq(w), expected), name


def test_moving_a_compiled_model_is_refused_with_what_to_do():
    _, graph = captured("llama")
    qmodel = mpqc.compile(graph, mpqc.Plan.uniform(graph, "mxint4"))
    qmodel.to("cpu").to(torch.float32)  # no change: allowed
    for move in (lambda: qmodel.to(torch.bfloat16), lambda: qmodel.half(), lambda: qmodel.to("meta")):
        with pytest.raises(ValueError, match=r"runs where its graph was captured \(cpu, torch.float32\).*capture it"):
            move()
    assert torch.equal(qmodel(new_ids()), mpqc.compile(graph, qmodel.plan)(new_ids()))  # nothing moved
    with pytest.raises(ValueError, match="input_ids are on meta, the model on cpu"):
        qmodel(new_ids().to("meta"))
