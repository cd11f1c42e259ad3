"""FindMatmuls: mark every matrix multiplication, and which of its operands is a weight.

Forms it recognises (the ``operands`` are the positions in ``node.args`` of the two
multiplied tensors a and b):

- ``aten.linear``: a @ b^T with b the [out, in] weight (Llama, OPT, GPT-NeoX, lm_head ...)
- ``aten.addmm`` / ``aten.mm``: GPT-2's Conv1D runs x @ W with W stored [in, out]
- ``aten.matmul`` / ``aten.bmm`` / ``aten.baddbmm``: attention (activation by
  activation) and ``x @ weight.T``-style code; MoE "batched_mm" experts run
  ``bmm(expert_weights[expert_ids], x)``
- ``aten._grouped_mm`` and ``transformers.grouped_mm_fallback``: MoE "grouped_mm"
  experts (transformers 5's default), x [tokens, in] times transposed stacked
  expert weights [experts, in, out]

A weight operand is one that reaches a parameter (or a float buffer of rank >= 2)
through layout-only ops (transpose, permute, dtype casts, expert gathers ...). The
fused ``scaled_dot_product_attention`` must be decomposed first (DecomposeAttention),
or its two matmuls would stay hidden. Matmuls inside higher-order-op subgraphs
(transformers runs rotary-embedding math under ``torch.no_grad``) are not model
weights and are left out, with a warning if any exists.
"""

from __future__ import annotations

import warnings

import torch

from mpqc.graph import weight_tensor

from ._common import AnalysisError, AnalysisPass, PassResult, mpqc_meta, shape_of

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

# Layout-only ops a weight may pass through on its way to a matmul: ops that keep every
# axis where it is, and ops whose axis mapping _input_axis knows.
_IDENTITY_OPS = {
    "aten.to.dtype",
    "aten.to.dtype_layout",
    "aten.to.device",
    "aten._to_copy.default",
    "aten.contiguous.default",
    "aten.clone.default",
    "aten.alias.default",
    "aten.detach.default",
    "aten.type_as.default",
    "aten.lift_fresh_copy.default",
}
_AXIS_MAPPING_OPS = {
    "aten.t.default",
    "aten.transpose.int",
    "aten.permute.default",
    "aten.expand.default",
    "aten.unsqueeze.default",
    "aten.index.Tensor",
}
# Ops that only reshape or select: if a weight reaches a matmul through one of these
# the pass cannot tell which weight elements are multiplied, and warns.
_SELECTING_OPS = ("view", "reshape", "slice", "select", "narrow", "chunk", "split", "squeeze", "getitem", "unfold")


def _rank(node) -> int | None:
    shape = shape_of(node)
    return None if shape is None else len(shape)


def _input_axis(node: torch.fx.Node, axis: int) -> int | None:
    """Map a non-negative ``axis`` of ``node``'s output to the axis of its first input, or None."""
    op = str(node.target)
    in_rank = _rank(node.args[0]) if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if in_rank is None:
        return None
    if op in _IDENTITY_OPS:
        return axis
    if op == "aten.t.default":
        return {0: 1, 1: 0}.get(axis, axis) if in_rank == 2 else axis
    if op == "aten.transpose.int":
        d0, d1 = (d % in_rank for d in node.args[1:3])
        return d1 if axis == d0 else d0 if axis == d1 else axis
    if op == "aten.permute.default":
        return node.args[1][axis] % in_rank
    if op == "aten.expand.default":
        return axis if len(node.args[1]) == in_rank else None
    if op == "aten.unsqueeze.default":
        d = node.args[1] % (in_rank + 1)
        return None if axis == d else axis - (axis > d)
    if op == "aten.index.Tensor":
        # Expert gather: weights[expert_ids] with one 1-D index on dim 0 keeps the rank.
        indices = node.args[1]
        if len(indices) == 1 and indices[0] is not None and _rank(indices[0]) == 1:
            return axis
        return None
    return None


def _reads_weight(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    return node.op == "get_attr" and weight_tensor(gm, node.target) is not None


def trace_weight(gm: torch.fx.GraphModule, operand, axis: int) -> tuple[str, int | None, tuple[str, ...]] | None:
    """Follow a matmul operand back through layout-only ops to a weight.

    Returns (weight FQN, the weight's axis matching ``axis`` of the operand or None when
    a step cannot map axes, the node names from the weight's get_attr to the operand),
    or None when the operand is not a weight.
    """
    node, ax, path = operand, axis, []
    while isinstance(node, torch.fx.Node):
        path.append(node.name)
        if _reads_weight(gm, node):
            return node.target, ax, tuple(reversed(path))
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return None
        op = str(node.target)
        if op not in _IDENTITY_OPS and op not in _AXIS_MAPPING_OPS:
            return None
        ax = None if ax is None else _input_axis(node, ax)
        node = node.args[0]
    return None


def _hidden_weight(gm: torch.fx.GraphModule, operand, depth: int = 8) -> tuple[str, str] | None:
    """A weight reaching ``operand`` through selecting ops trace_weight does not follow: (FQN, op)."""
    node, first_op = operand, None
    for _ in range(depth):
        if not isinstance(node, torch.fx.Node):
            return None
        if _reads_weight(gm, node):
            return (node.target, first_op) if first_op else None
        if node.op != "call_function" or not node.args:
            return None
        op = str(node.target)
        if not (op in _IDENTITY_OPS or any(s in op for s in _SELECTING_OPS) or "transpose" in op or "permute" in op):
            return None
        if first_op is None and any(s in op for s in _SELECTING_OPS):
            first_op = op
        node = node.args[0]
    return None


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
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            op = str(node.target)
            if op in UNMODELLED_CONTRACTIONS:
                warnings.warn(
                    f"node {node.name!r} is {op}, a contraction FindMatmuls does not model; it stays unquantized",
                    stacklevel=2,
                )
            if op not in MATMUL_OPS:
                continue
            operands, linear_weight = MATMUL_OPS[op]
            axes = _reduction_axes(node, operands, linear_weight)
            weight = weight_operand = weight_axis = weight_shape = weight_path = None
            for arg_pos, axis in zip(operands, axes):
                rank = _rank(node.args[arg_pos])
                if rank is None:
                    raise AnalysisError(
                        f"matmul node {node.name!r}: operand {arg_pos} has no recorded shape (meta['val'])"
                    )
                traced = trace_weight(gm, node.args[arg_pos], axis % rank)
                if traced is not None:
                    weight, weight_axis, weight_path = traced
                    weight_operand = arg_pos
                    weight_shape = tuple(weight_tensor(gm, weight).shape)
                    break
                hidden = _hidden_weight(gm, node.args[arg_pos])
                if hidden:
                    warnings.warn(
                        f"matmul node {node.name!r}: operand {arg_pos} comes from weight {hidden[0]!r} through "
                        f"{hidden[1]}, which FindMatmuls cannot follow; it is treated as an activation",
                        stacklevel=2,
                    )
            # A weight operand's axis is given counted from the front (its rank is fixed);
            # an activation's from the back (its leading batch dims vary).
            if weight_operand is not None:
                i = operands.index(weight_operand)
                axes = tuple(a % _rank(node.args[weight_operand]) if j == i else a for j, a in enumerate(axes))
            meta = mpqc_meta(node)
            meta.update(
                matmul=True,
                op=op,
                operands=operands,
                reduction_axes=axes,
                weight=weight,
                weight_operand=weight_operand,
                weight_shape=weight_shape,
                weight_reduction_axis=weight_axis,
                weight_path=weight_path,
            )
        self._warn_nested(gm)
        return PassResult(gm, False)

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
