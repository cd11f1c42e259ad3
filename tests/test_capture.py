"""mpqc.capture and DecomposeAttention: export, runnable logits module, numerics, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import (
    ARCH_ATTN,
    ARCHS,
    EXAMPLE_SHAPE,
    LAYERS,
    Attention,
    BranchyLM,
    captured,
    example_ids,
    hand_count_matmul_params,
    tiny_model,
)

from mpqc.capture import CaptureError, capture
from mpqc.passes.transform.decompose_attention import DecomposeAttention, DecompositionError

# Float32 logits of the captured graph against the model itself. The eager graphs run
# the model's own ops; the decomposed attention reorders float32 arithmetic against
# the fused SDPA kernel (scale applied after Q @ K^T instead of to Q and K, another
# softmax kernel), which moves each score by a few ulp (~1e-7 relative). Through two
# layers of 64-wide dot products that stays below 1e-6 on logits of size ~1 (measured
# max 3e-7); 1e-5 leaves margin and is still 1e4 times below the logits' spread.
ATOL = RTOL = 1e-5

NEW_SHAPE = (3, 11)  # batch and sequence length both differ from the example (2, 8)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch,attn", ARCH_ATTN)
def test_captured_logits_match_model_on_new_shape(arch, attn):
    model, graph = captured(arch, attn)
    ids = example_ids(NEW_SHAPE, seed=7)
    with torch.no_grad():
        out = graph.module(ids)
    assert isinstance(out, torch.Tensor), "graph.module returns the logits tensor, not a ModelOutput"
    assert out.shape == (*NEW_SHAPE, model.config.vocab_size)
    torch.testing.assert_close(out, logits(model, ids), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("arch,attn", ARCH_ATTN)
def test_matmul_params_add_up_to_hand_count(arch, attn):
    model, graph = captured(arch, attn)
    assert graph.total_params == hand_count_matmul_params(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_matmuls_are_separate_nodes(arch):
    attn = "eager" if arch == "gemma2" else "sdpa"
    _, graph = captured(arch, attn)
    targets = [str(n.target) for n in graph.module.graph.nodes if n.op == "call_function"]
    assert not any("scaled_dot_product" in t for t in targets)
    roles = [m.role for m in graph.matmuls]
    assert roles.count("attention_scores") == LAYERS
    assert roles.count("attention_values") == LAYERS
    assert all(m.op == "aten.matmul.default" for m in graph.matmuls if m.role.startswith("attention_"))


def test_sdpa_and_eager_graphs_annotate_alike():
    _, sdpa = captured("llama", "sdpa")
    _, eager = captured("llama", "eager")
    keys = lambda g: [(m.name, m.role, m.layer, m.params, m.macs_per_token, m.reduction_axes) for m in g.matmuls]  # noqa: E731
    assert keys(sdpa) == keys(eager)


def test_decompose_attention_leaves_eager_graph_unchanged():
    model = tiny_model("llama", "eager")
    ep = torch.export.export(model, (example_ids(),), kwargs={"use_cache": False}, strict=False)
    gm = ep.module(check_guards=False)
    before = gm.code
    result = DecomposeAttention()(gm)
    assert result.modified is False
    assert gm.code == before


def test_example_with_batch_and_sequence_of_one_still_gives_dynamic_graph():
    model, _ = captured("llama", "sdpa")
    graph = capture(model, (example_ids((1, 1)),))
    assert graph.reference_seq_len == 1 and graph.reference_batch_size == 1
    # Attention MACs are counted at the reference length: heads * seq * head_dim.
    assert graph.matmul("layers.0.attention_scores").macs_per_token == 4 * 1 * 16
    for shape in [(1, 1), (1, 9), NEW_SHAPE]:
        ids = example_ids(shape, seed=3)
        with torch.no_grad():
            torch.testing.assert_close(graph.module(ids), logits(model, ids), atol=ATOL, rtol=RTOL)


def test_static_capture_keeps_example_shape():
    model, _ = captured("gpt2", "sdpa")
    graph = capture(model, (example_ids(),), dynamic=False)
    shape = graph.module.graph.find_nodes(op="placeholder")[0].meta["val"].shape
    assert tuple(shape) == EXAMPLE_SHAPE
    ids = example_ids(EXAMPLE_SHAPE, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(graph.module(ids), logits(model, ids), atol=ATOL, rtol=RTOL)


def test_capture_leaves_the_model_alone_apart_from_eval_mode():
    model = tiny_model("qwen2", "sdpa").train()
    params_before = {name: p for name, p in model.named_parameters()}
    values_before = {name: p.detach().clone() for name, p in params_before.items()}
    graph = capture(model, (example_ids(),))
    assert model.training is False
    assert {name: p for name, p in model.named_parameters()} == params_before
    for name, p in model.named_parameters():
        assert torch.equal(p, values_before[name]), name
    assert not model._forward_hooks and not model._forward_pre_hooks
    # The graph shares the model's parameters rather than copying them.
    assert graph.module.get_parameter("lm_head.weight") is model.lm_head.weight


def test_export_failure_raises_capture_error_naming_module_and_remedy():
    model = BranchyLM().eval()
    with pytest.raises(CaptureError) as info:
        capture(model, (example_ids(),))
    message = str(info.value)
    assert "BranchyLM" in message
    assert "layers.0.gate (Branchy)" in message
    assert "if x.sum() > 0" in message  # the source line that failed
    assert "data-dependent control flow" in message
    assert "draft_export" in message
    assert info.value.__cause__ is not None  # the original export error is chained


def test_moe_eager_experts_error_suggests_grouped_mm():
    model = tiny_model("mixtral", "sdpa", experts="eager")
    with pytest.raises(CaptureError) as info:
        capture(model, (example_ids(),))
    message = str(info.value)
    assert "MixtralForCausalLM" in message
    assert "model.layers.0.mlp.experts (MixtralExperts)" in message
    assert "experts_implementation='grouped_mm'" in message


@pytest.mark.parametrize(
    "bad, error",
    [
        ((torch.randn(2, 8),), TypeError),
        ((torch.zeros(8, dtype=torch.long),), TypeError),
        ((example_ids(), example_ids()), TypeError),
        ((torch.zeros(2, 0, dtype=torch.long),), ValueError),
    ],
)
def test_capture_rejects_inputs_that_are_not_token_ids(bad, error):
    model, _ = captured("llama", "sdpa")
    with pytest.raises(error, match="input_ids|example_inputs"):
        capture(model, bad)


# ---- DecomposeAttention on F.scaled_dot_product_attention directly ----------------------

B, H, L, D = 2, 4, 6, 16


def _qkv(kv_heads=H, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float32).to(dtype)
    k = torch.randn(B, kv_heads, L, D, generator=g, dtype=torch.float32).to(dtype)
    v = torch.randn(B, kv_heads, L, D, generator=g, dtype=torch.float32).to(dtype)
    return q, k, v


CAUSAL = torch.ones(L, L, dtype=torch.bool).tril()
ROW_MASKED = CAUSAL.clone()
ROW_MASKED[2] = False  # a fully masked query row: SDPA (and _safe_softmax) give zeros, not NaN

SDPA_CASES = {
    "no_mask": ({}, None, H),
    "bool_mask": ({}, CAUSAL, H),
    "fully_masked_row": ({}, ROW_MASKED, H),
    "float_mask": ({}, torch.randn(L, L, generator=torch.Generator().manual_seed(3)), H),
    "is_causal": ({"is_causal": True}, None, H),
    "scale": ({"scale": 0.3}, CAUSAL, H),
    "enable_gqa": ({"enable_gqa": True}, CAUSAL, 2),
}


@pytest.mark.parametrize("case", SDPA_CASES)
def test_decomposed_attention_matches_fused_sdpa(case):
    kwargs, mask, kv_heads = SDPA_CASES[case]
    module = Attention(**kwargs)
    q, k, v = _qkv(kv_heads)
    args = (q, k, v) if mask is None else (q, k, v, mask)
    gm = torch.export.export(module, args, strict=False).module(check_guards=False)
    assert DecomposeAttention()(gm).modified
    matmuls = [n for n in gm.graph.nodes if n.target is torch.ops.aten.matmul.default]
    assert [n.name for n in matmuls] == ["attention_scores", "attention_values"]
    # float32: a few ulp of reassociation (see ATOL above), on outputs of size ~1.
    torch.testing.assert_close(gm(*args), module(*args), atol=1e-6, rtol=1e-5)


def test_decomposed_attention_in_bfloat16_rounds_scores_like_eager_attention():
    q, k, v = _qkv(dtype=torch.bfloat16)
    gm = torch.export.export(Attention(), (q, k, v, CAUSAL), strict=False).module(check_guards=False)
    DecomposeAttention()(gm)
    out = gm(q, k, v, CAUSAL)
    assert out.dtype == torch.bfloat16
    # The scores matmul now rounds to bfloat16 before the float32 softmax, as eager
    # attention does, where fused SDPA keeps them in float32: the two differ by about one
    # bfloat16 ulp (2^-8 relative) of outputs of size ~1.
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=CAUSAL), atol=2e-2, rtol=2e-2)
    eager = torch.softmax((q @ k.transpose(-2, -1)).float() * D**-0.5 + torch.where(CAUSAL, 0.0, float("-inf")), -1)
    torch.testing.assert_close(out, (eager.to(v.dtype) @ v), atol=0, rtol=0)


def test_decompose_attention_refuses_dropout():
    q, k, v = _qkv()
    gm = torch.export.export(Attention(dropout_p=0.1), (q, k, v), strict=False).module(check_guards=False)
    with pytest.raises(DecompositionError, match="dropout_p=0.1.*eval mode"):
        DecomposeAttention()(gm)
