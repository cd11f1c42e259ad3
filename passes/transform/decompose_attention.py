"""DecomposeAttention: split fused scaled-dot-product attention into its two matmuls.

``attn_implementation="sdpa"`` (transformers' default) exports attention as one
``aten.scaled_dot_product_attention`` node, which hides the two matmuls a
mixed-precision plan must reach. This pass replaces each such node by what the
op computes (PyTorch's math reference):

    scores = matmul(Q, K^T)                       # node "attention_scores*"
    scores = float32(scores) * scale              # softmax in float32, as SDPA does
    scores = masked (bool mask: -inf where False; float mask: added; is_causal: tril)
    P      = _safe_softmax(scores, -1)            # fully masked rows give 0, like SDPA
    out    = matmul(P.to(V.dtype), V)             # node "attention_values*"

The scale multiplies the scores after the matmul (not Q and K before it, as fused
kernels do) so that the matmul's operands are exactly Q and K, which is what an
activation quantizer should see. ``enable_gqa`` repeats K and V heads first. A
graph with eager attention has no such node and is returned unchanged.
"""

from __future__ import annotations

import math

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
# Meta that says where a node came from; the new nodes inherit it from the fused node.
_PROVENANCE_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn", "from_node")


class DecompositionError(ValueError):
    """An attention node this pass cannot decompose faithfully."""


class DecomposeAttention(PassBase):
    """Replace every ``aten.scaled_dot_product_attention`` node by two ``aten.matmul`` nodes."""

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        fused = list(graph_module.graph.find_nodes(op="call_function", target=SDPA))
        for node in fused:
            _decompose(graph_module.graph, node)
        if fused:
            graph_module.graph.lint()
            graph_module.recompile()
        return PassResult(graph_module, bool(fused))

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        left = [n.name for n in graph_module.graph.find_nodes(op="call_function", target=SDPA)]
        if left:
            raise DecompositionError(f"attention nodes {left} are still fused after DecomposeAttention")


def _bind(node: torch.fx.Node) -> dict:
    bound = dict(_SDPA_DEFAULTS)
    bound.update(zip(_SDPA_PARAMS, node.args))
    bound.update(node.kwargs)
    return bound


def _decompose(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    a = _bind(node)
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    qv, kv, vv = (x.meta["val"] for x in (q, k, v))
    where = f"attention node {node.name!r}"
    if a["dropout_p"] != 0.0:
        raise DecompositionError(
            f"{where} has dropout_p={a['dropout_p']}; capture the model in eval mode so attention dropout is 0"
        )
    if a["is_causal"] and mask is not None:
        raise DecompositionError(f"{where} sets both attn_mask and is_causal, which SDPA itself rejects")
    head_dim = qv.shape[-1]
    if not isinstance(head_dim, int):
        raise DecompositionError(f"{where}: head_dim {head_dim} is symbolic; it must be static to fix the scale")
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(head_dim)
    fake_mode = qv.fake_mode

    def emit(target, args, kwargs=None, name=None) -> torch.fx.Node:
        kwargs = kwargs or {}
        new = graph.create_node("call_function", target, tuple(args), kwargs, name=name)
        for key in _PROVENANCE_META:
            if key in node.meta:
                new.meta[key] = node.meta[key]
        fake_args, fake_kwargs = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
        with fake_mode:
            new.meta["val"] = target(*fake_args, **fake_kwargs)
        return new

    with graph.inserting_before(node):
        if a["enable_gqa"] and qv.shape[-3] != kv.shape[-3]:
            groups = qv.shape[-3] // kv.shape[-3]
            k = emit(aten.repeat_interleave.self_int, (k, groups, -3))
            v = emit(aten.repeat_interleave.self_int, (v, groups, -3))
        k_t = emit(aten.transpose.int, (k, -2, -1))
        scores = emit(aten.matmul.default, (q, k_t), name="attention_scores")
        s = scores if qv.dtype == torch.float32 else emit(aten.to.dtype, (scores, torch.float32))
        s = emit(aten.mul.Tensor, (s, scale))
        if a["is_causal"]:
            # SDPA's causal mask is aligned top-left: query i sees keys 0..i.
            q_len = emit(aten.sym_size.int, (q, qv.dim() - 2))
            k_len = emit(aten.sym_size.int, (k, kv.dim() - 2))
            ones = emit(aten.new_ones.default, (s, [q_len, k_len]), {"dtype": torch.bool})
            mask = emit(aten.tril.default, (ones,))
        if mask is not None:
            if mask.meta["val"].dtype == torch.bool:
                s = emit(aten.masked_fill.Scalar, (s, emit(aten.logical_not.default, (mask,)), float("-inf")))
            else:
                s = emit(aten.add.Tensor, (s, mask))
        p = emit(aten._safe_softmax.default, (s, -1))
        if vv.dtype != torch.float32:
            p = emit(aten.to.dtype, (p, vv.dtype))
        values = emit(aten.matmul.default, (p, v), name="attention_values")
        out = values if values.meta["val"].dtype == qv.dtype else emit(aten.to.dtype, (values, qv.dtype))
    for matmul in (scores, values):
        matmul.meta.setdefault("mpqc", {})["decomposed_from"] = node.name
    node.replace_all_uses_with(out)
    graph.erase_node(node)
