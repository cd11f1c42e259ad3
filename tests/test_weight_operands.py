"""Weight operands found through any selection op, and the invariant that no parameter is taken for an activation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import mpqc
from mpqc.capture import CaptureError, capture
from mpqc.formats import quantize
from mpqc.passes.analysis import WeightOperandError, analysis_passes
from mpqc.passes.analysis.weight_operands import CheckWeightOperands
from tiny_models import EXAMPLE_SHAPE, HEADS, HIDDEN, KV_HEADS, LAYERS, VOCAB, example_ids, hand_count_matmul_params

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
        "falcon", hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_kv_heads=KV_HEADS,
        new_decoder_architecture=True, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
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
        "aten.matmul.default", 1, (-1, 0), 1)
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
        self.weights = nn.ParameterDict({k: nn.Parameter(torch.randn(HIDDEN, HIDDEN) / HIDDEN**0.5) for k in self.FORMS})
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
    assert set(by_weight) == {f"weights.{k}" for k in Spellings.FORMS} | {"embed.weight", "head.weight"} - {"embed.weight"}
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
