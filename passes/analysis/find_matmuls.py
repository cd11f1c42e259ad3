"""FindMatmuls: mark every matrix multiplication, and which of its operands is a weight.

Forms it recognises (the ``operands`` are the positions in ``node.args`` of the two
multiplied tensors a and b):

- ``aten.linear``: a @ b^T with b the [out, in] weight (Llama, OPT, GPT-NeoX, lm_head ...)
- ``aten.addmm`` / ``aten.mm``: GPT-2's Conv1D runs x @ W with W stored [in, out]
- ``aten.matmul`` / ``aten.bmm`` / ``aten.baddbmm``: attention (activation by
  activation) and ``x @ weight.T``-style code (Falcon's ``numpy_T``); MoE "batched_mm"
  experts run ``bmm(expert_weights[expert_ids], x)``
- ``aten._grouped_mm`` and ``transformers.grouped_mm_fallback``: MoE "grouped_mm"
  experts (transformers 5's default), x [tokens, in] times transposed stacked
  expert weights [experts, in, out]

A weight operand is one made of a parameter's (or a float buffer's of rank >= 2) own
elements, through any view, view-copy, cast, copy or gather (``_selection``: ops are told
apart by what they do, not by name), whose reduced axis runs along one whole axis of the
parameter: that axis is ``weight_reduction_axis``, the one the weight is quantized along.
An operand made from a parameter any other way is left unmarked here, and
CheckWeightOperands, the last analysis pass, refuses the graph naming it. The fused
``scaled_dot_product_attention`` must be decomposed first (DecomposeAttention), or its
two matmuls would stay hidden. Matmuls inside higher-order-op subgraphs (transformers
runs rotary-embedding math under ``torch.no_grad``) are not model weights and are left
out, with a warning if any exists.
"""

from __future__ import annotations

import warnings

import torch

from ._common import AnalysisError, AnalysisPass, PassResult, mpqc_meta, shape_of
from ._selection import Dependence, trace_operand

# op -> (positions of a and b in node.args, whether b is a linear-layout [out, in] weight)
MATMUL_OPS: dict[str, tuple[tuple[int, int], bool]] = {
    "aten.linear.default": ((0, 1), True),
    "aten.addmm.default": ((1, 2), False),
    "aten.mm.default": ((0, 1), False),
    "aten.bmm.default": ((0, 1), False),
    "aten.matmul.default": ((0, 1), False),
    "aten.baddbmm.default": ((1, 2), False),
    "aten._grouped_mm.default": ((0, 1), False),
    "transformers.grouped_mm_fallback.default": ((0, 1), False),
}

# Fused attention kernels hide two matmuls; DecomposeAttention turns the first into matmuls.
FUSED_ATTENTION_MARKERS = ("scaled_dot_product", "flash_attention", "flex_attention", "efficient_attention")

# Contractions this pass does not model; it says so rather than skip them silently.
UNMODELLED_CONTRACTIONS = ("aten.einsum.default", "aten.tensordot.default", "aten.convolution.default")


def _rank(node) -> int | None:
    shape = shape_of(node)
    return None if shape is None else len(shape)


def _reduction_axes(node: torch.fx.Node, operands: tuple[int, int], linear_weight: bool) -> tuple[int, int]:
    """Reduced axis of a and b as they appear at the node (negative: counted from the end)."""
    b_rank = _rank(node.args[operands[1]])
    if linear_weight:
        return -1, -1  # x [..., in] and W [out, in] both reduce over `in`
    if b_rank == 1:
        return -1, -1  # matrix @ vector
    return -1, -2


class FindMatmuls(AnalysisPass):
    """Mark matmul nodes: ``matmul``, ``op``, ``operands``, ``reduction_axes`` and the weight operand."""

    provides = (
        "matmul",
        "op",
        "operands",
        "reduction_axes",
        "weight",
        "weight_operand",
        "weight_shape",
        "weight_reduction_axis",
        "weight_path",
    )

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        fused = [
            n.name
            for n in graph_module.graph.nodes
            if n.op == "call_function" and any(m in str(n.target) for m in FUSED_ATTENTION_MARKERS)
        ]
        if fused:
            raise AnalysisError(
                f"the graph has fused attention nodes {fused}, which hide the attention matmuls; "
                "run DecomposeAttention first (mpqc.capture does), or capture with attn_implementation='eager'"
            )

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        gm = graph_module
        dep = Dependence.of(gm)
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            op = str(node.target)
            if op in UNMODELLED_CONTRACTIONS:
                warnings.warn(
                    f"node {node.name!r} is {op}, a contraction FindMatmuls does not model; it stays unquantized",
                    stacklevel=2,
                )
            if op in MATMUL_OPS:
                mpqc_meta(node).update(self._annotate(gm, node, op, dep))
        self._warn_nested(gm)
        return PassResult(gm, False)

    @staticmethod
    def _annotate(gm: torch.fx.GraphModule, node: torch.fx.Node, op: str, dep: Dependence) -> dict:
        operands, linear_weight = MATMUL_OPS[op]
        axes = _reduction_axes(node, operands, linear_weight)
        found = dict(weight=None, weight_operand=None, weight_shape=None, weight_reduction_axis=None, weight_path=None)
        for arg_pos, axis in zip(operands, axes):
            rank = _rank(node.args[arg_pos])
            if rank is None:
                raise AnalysisError(f"matmul node {node.name!r}: operand {arg_pos} has no recorded shape (meta['val'])")
            trace = trace_operand(gm, node.args[arg_pos], dep)
            weight_axis = trace.weight_axis(axis % rank)[0] if trace is not None else None
            if weight_axis is None:
                continue  # an activation, or a parameter CheckWeightOperands will report
            found.update(
                weight=trace.weight,
                weight_operand=arg_pos,
                weight_shape=trace.weight_shape,
                weight_reduction_axis=weight_axis,
                weight_path=trace.names,
            )
            # A weight operand's axis is given counted from the front (its rank is fixed);
            # an activation's from the back (its leading batch dims vary).
            i = operands.index(arg_pos)
            axes = tuple(a % rank if j == i else a for j, a in enumerate(axes))
            break
        return dict(matmul=True, op=op, operands=operands, reduction_axes=axes, **found)

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        super().ensures(graph_module)
        if not any(n.meta.get("mpqc", {}).get("matmul") for n in graph_module.graph.nodes):
            raise AnalysisError(f"FindMatmuls found no matmul in the graph; known forms: {', '.join(MATMUL_OPS)}")

    @staticmethod
    def _warn_nested(gm: torch.fx.GraphModule) -> None:
        for name, sub in gm.named_modules():
            if sub is gm or not isinstance(sub, torch.fx.GraphModule):
                continue
            found = [n.name for n in sub.graph.nodes if n.op == "call_function" and str(n.target) in MATMUL_OPS]
            if found:
                warnings.warn(
                    f"subgraph {name!r} holds matmuls {found} that FindMatmuls does not analyse "
                    "(subgraphs of higher-order ops such as no_grad regions); they stay unquantized",
                    stacklevel=3,
                )
