"""Weight operands found through any selection op, and the invariant that no parameter is taken for an activation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import EXAMPLE_SHAPE, HEADS, HIDDEN, KV_HEADS, LAYERS, VOCAB, example_ids, hand_count_matmul_params
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import mpqc
from mpqc.capture import CaptureError, capture
from mpqc.formats import quantize
from mpqc.passes.analysis import WeightOperandError, analysis_passes
from mpqc.passes.analysis.weight_operands import CheckWeightOperands

# Compiled logits against a hand-quantized eager model: the same float32 ops in another
# order (the graph's decomposition), so they agree to rounding (see test_compile).
ATOL, RTOL = 1e-5, 1e-4


def new_ids():
    return example_ids((3, 11), seed=7)


def weight_only(graph) -> mpqc.QuantizedModel:
    return mpqc.compile(graph, mpqc.Plan.uniform(graph, "mxint4", activations=False, high="fp32"))


# ---- Falcon: input @ self.weight.T is numpy_T then matmul --------------------------------------


@pytest.fixture(scope="module")
def falcon():
    config = AutoConfig.for_model(
        "falcon",
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_kv_heads=KV_HEADS,
        new_decoder_architecture=True,
        vocab_size=VOCAB,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    return model, capture(model, (example_ids(),))


def test_falcon_projections_are_weights_through_numpy_t(falcon):
    model, graph = falcon
    layer = [(m.name, m.role) for m in graph.matmuls if m.layer == 0]
    assert layer == [
        ("h.0.self_attention.query_key_value", "qkv_proj"),
        ("h.0.attention_scores", "attention_scores"),
        ("h.0.attention_values", "attention_values"),
        ("h.0.self_attention.dense", "o_proj"),
        ("h.0.mlp.dense_h_to_4h", "up_proj"),
        ("h.0.mlp.dense_4h_to_h", "down_proj"),
    ]
    nodes = {n.name: n for n in graph.module.graph.nodes}
    qkv = graph.matmul("h.0.self_attention.query_key_value")
    assert [str(nodes[n].target) for n in qkv.weight_path[1:]] == ["aten.numpy_T.default"]
    # x [.., in] @ W.T [in, out]: the operand's axis 0 is the parameter's axis 1.
    assert (qkv.op, qkv.weight_operand, qkv.reduction_axes, qkv.weight_reduction_axis) == (
        "aten.matmul.default",
        1,
        (-1, 0),
        1,
    )
    assert graph.total_params == hand_count_matmul_params(model)


def test_falcon_weight_only_equals_hand_quantized_weights(falcon):
    model, graph = falcon
    hand = copy.deepcopy(model)
    # Falcon ties its head to the embedding: untie it, since the lookup keeps the float embedding.
    assert hand.lm_head.weight is hand.transformer.word_embeddings.weight
    hand.lm_head.weight = nn.Parameter(hand.lm_head.weight.detach().clone())
    with torch.no_grad():
        for module in hand.modules():
            if isinstance(module, nn.Linear):  # FalconLinear is a Linear with its own forward
                module.weight.copy_(quantize(module.weight, "mxint4", axis=1))
        expected = hand(new_ids(), use_cache=False).logits
    torch.testing.assert_close(weight_only(graph)(new_ids()), expected, atol=ATOL, rtol=RTOL)


# ---- spellings no list names: found by what they do -----------------------------------------------


class Spellings(nn.Module):
    """One [out, in] weight per matmul, each reaching it another way."""

    FORMS = {
        "mT": lambda x, w: x @ w.mT,
        "movedim": lambda x, w: x @ w.movedim(0, 1),
        "swapaxes": lambda x, w: x @ torch.swapaxes(w, 0, 1),
        "contiguous_T": lambda x, w: x @ w.T.contiguous(),
        "casts": lambda x, w: (x.bfloat16() @ w.to(torch.bfloat16).t()).float(),
        "flatten_unflatten": lambda x, w: x @ w.flatten().unflatten(0, w.shape).t(),
        "clone_linear": lambda x, w: F.linear(x, w.clone()),
        "expand_bmm": lambda x, w: torch.bmm(x, w.t().unsqueeze(0).expand(x.shape[0], -1, -1)),
        "weight_on_the_left": lambda x, w: (w @ x.transpose(-1, -2)).transpose(-1, -2),
        "chunk_rows": lambda x, w: F.linear(x, torch.chunk(w, 2, dim=0)[1]).repeat(1, 1, 2),
    }

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.weights = nn.ParameterDict(
            {k: nn.Parameter(torch.randn(HIDDEN, HIDDEN) / HIDDEN**0.5) for k in self.FORMS}
        )
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, weights=None):
        h = self.embed(input_ids)
        for name, form in self.FORMS.items():
            w = (weights or self.weights)[name]
            h = torch.tanh(form(h, w))
        return self.head(h)


@pytest.fixture(scope="module")
def spellings():
    torch.manual_seed(0)
    model = Spellings().eval()
    return model, capture(model, (example_ids(),))


def test_every_spelling_finds_its_weight_and_its_input_axis(spellings):
    _, graph = spellings
    by_weight = {m.weight: m for m in graph.matmuls if m.has_weight}
    assert set(by_weight) == {f"weights.{k}" for k in Spellings.FORMS} | {"embed.weight", "head.weight"} - {
        "embed.weight"
    }
    for name in Spellings.FORMS:
        m = by_weight[f"weights.{name}"]
        assert (m.weight_shape, m.weight_reduction_axis) == ((HIDDEN, HIDDEN), 1), name
    assert not [m.name for m in graph.matmuls if not m.has_weight]  # no weight taken for an activation
    assert graph.total_params == hand_count_matmul_params_of(graph)


def hand_count_matmul_params_of(graph) -> int:
    return len(Spellings.FORMS) * HIDDEN * HIDDEN + VOCAB * HIDDEN


def test_every_spelling_quantizes_like_hand_quantized_weights(spellings):
    model, graph = spellings
    with torch.no_grad():
        quantized = {k: quantize(w, "mxint4", axis=1) for k, w in model.weights.items()}
        head = copy.deepcopy(model)
        head.head.weight.copy_(quantize(model.head.weight, "mxint4", axis=1))
        expected = head(new_ids(), weights=quantized)
    torch.testing.assert_close(weight_only(graph)(new_ids()), expected, atol=ATOL, rtol=RTOL)


# ---- the invariant: a parameter reaching a matmul any other way is refused by name ---------------


class OneMatmul(nn.Module):
    """embed -> ``form(h, w)`` -> head: ``form`` decides how ``w`` reaches its matmul."""

    def __init__(self, form, shape=(HIDDEN, HIDDEN)):
        super().__init__()
        self.form = form
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.w = nn.Parameter(torch.randn(*shape) / HIDDEN**0.5)
        self.v = nn.Parameter(torch.randn(*shape) / HIDDEN**0.5)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids):
        return self.head(torch.tanh(self.form(self.embed(input_ids), self.w, self.v)))


def capture_form(form, shape=(HIDDEN, HIDDEN)):
    torch.manual_seed(0)
    return capture(OneMatmul(form, shape).eval(), (example_ids(),))


def test_a_chain_the_trace_has_never_seen_is_refused_naming_parameter_node_and_ops():
    # roll moves the weight's elements; it is no view, cast, copy or gather, so the operand
    # is computed from w, not w itself: quantizing it as an activation would be silently wrong.
    with pytest.raises(WeightOperandError) as info:
        capture_form(lambda h, w, v: h @ torch.roll(w, 1, 0).t())
    text = str(info.value)
    assert "parameter 'w'" in text and "matmul 'activation_matmul'" in text and "operand 1" in text
    assert "through aten.roll.default -> aten.t.default" in text
    assert "aten.roll.default is not a view, cast, copy or gather of the weight" in text


@pytest.mark.parametrize(
    "form, why",
    [
        (lambda h, w, v: h @ (2 * w).t(), "aten.mul.Tensor is not a view, cast, copy or gather"),
        (lambda h, w, v: h @ torch.clamp(w, -0.01, 0.01).t(), "aten.clamp.default is not a view, cast, copy or gather"),
        (lambda h, w, v: h @ (w + v).t(), "computed from this weight together with other tensors"),
        (lambda h, w, v: (h @ torch.cat([w, v], 0).t())[..., :HIDDEN], "together with other tensors"),
        # The matmul reduces over halves of w's input axis: quantizing w along that axis in
        # blocks would not match the blocks each half is reduced over.
        (
            lambda h, w, v: (
                (h.unflatten(-1, (2, HIDDEN // 2)).unsqueeze(-2) @ w.t().reshape(2, HIDDEN // 2, HIDDEN))
                .sum(-3)
                .squeeze(-2)
            ),
            "runs over 32 of the 64 elements of weight axis 1",
        ),
    ],
    ids=["scaled", "clamped", "sum_of_two", "concatenated", "half_axis"],
)
def test_weights_reaching_a_matmul_through_computation_are_refused(form, why):
    with pytest.raises(WeightOperandError, match="parameter '[wv]'") as info:
        capture_form(form)
    assert why in str(info.value)


def test_a_matmul_of_two_parameters_is_refused_for_the_second():
    with pytest.raises(WeightOperandError) as info:
        capture_form(lambda h, w, v: h @ (w @ v))
    assert "recorded weight: w" in str(info.value) and "parameter 'v'" in str(info.value)


def test_an_op_that_keeps_values_is_followed_and_one_that_changes_them_is_not():
    # Neither op is named anywhere: the probe of distinct values tells them apart.
    graph = capture_form(lambda h, w, v: (h.bfloat16() @ torch.nan_to_num(w).bfloat16().t()).float())
    (m,) = [m for m in graph.matmuls if m.weight == "w"]
    nodes = {n.name: n for n in graph.module.graph.nodes}
    assert [str(nodes[n].target) for n in m.weight_path[1:]] == [
        "aten.nan_to_num.default",
        "aten.to.dtype",
        "aten.t.default",
    ]
    with pytest.raises(WeightOperandError, match="aten.round.default is not a view, cast, copy or gather"):
        capture_form(lambda h, w, v: h @ torch.round(w).t())


def test_looked_up_rows_are_activations_and_gathered_expert_matrices_are_weights():
    # embed(ids) straight into a linear (OPT's project_in): the rows are activations.
    graph = capture_form(lambda h, w, v: F.linear(h, w))
    assert [(m.weight, m.weight_operand) for m in graph.matmuls] == [("w", 1), ("head.weight", 1)]

    # w stacked as 2 experts of [HIDDEN // 2, HIDDEN], gathered by data-dependent ids.
    def experts(h, w, v):
        ids = (h[..., 0] > 0).long().flatten()  # one expert per token
        picked = w.view(2, HIDDEN // 2, HIDDEN)[ids]  # [tokens, out, in]
        return torch.bmm(picked, h.reshape(-1, HIDDEN, 1)).view(*h.shape[:-1], HIDDEN // 2).repeat(1, 1, 2)

    graph = capture_form(experts)
    (m,) = [m for m in graph.matmuls if m.weight == "w"]
    assert (m.weight_operand, m.weight_reduction_axis, m.params) == (0, 1, HIDDEN * HIDDEN)


def test_the_total_is_checked_against_the_distinct_tensors_multiplied():
    gm = torch.export.export(OneMatmul(lambda h, w, v: h @ w.t()).eval(), (example_ids(),), strict=False)
    gm = gm.module(check_guards=False)
    for p in analysis_passes()[:-1]:
        p(gm)
    CheckWeightOperands()(gm)  # consistent as analysed
    (node,) = [n for n in gm.graph.nodes if n.meta.get("mpqc", {}).get("weight") == "w"]
    node.meta["mpqc"]["params"] = 0  # as if ComputeCosts had lost w
    with pytest.raises(WeightOperandError, match=r"the matmuls own 8,192 weight elements, but the distinct tensors"):
        CheckWeightOperands()(gm)


# ---- shapes: a size the model's code fixes is refused at capture, naming the dimension -------------


class FixedSize(nn.Module):
    def __init__(self, fix):
        super().__init__()
        self.fix = fix
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids):
        return self.head(self.fix(self.embed(input_ids)))


def _loop_over_positions(h):  # a recurrence written as a Python loop, like Mamba's slow path
    state, out = torch.zeros_like(h[:, 0]), []
    for t in range(h.shape[1]):
        state = 0.5 * state + h[:, t]
        out.append(state)
    return torch.stack(out, 1)


def _one_chunk(h):  # a chunked scan that branches on the number of chunks, traced with one
    chunks = (h.shape[1] + 7) // 8
    return h.cumsum(1) if chunks == 1 else h


@pytest.mark.parametrize(
    "fix, message",
    [
        (_loop_over_positions, "specialized the sequence dimension of input_ids to 8"),
        (lambda h: h.reshape(2, -1, HIDDEN), "specialized the batch dimension of input_ids to 2"),
        (_one_chunk, r"sequence size 9 fails `input_ids.size\(\)\[1\] <= 8`"),
    ],
    ids=["loop", "reshape_to_batch_2", "one_chunk"],
)
def test_a_size_the_code_fixes_is_refused_at_capture_naming_the_dimension(fix, message):
    with pytest.raises(CaptureError, match=message):
        capture(FixedSize(fix).eval(), (example_ids(EXAMPLE_SHAPE),))
