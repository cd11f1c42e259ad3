"""CheckWeightOperands: no parameter reaches a matmul except as that matmul's weight operand.

The last analysis pass, run on every capture. For every operand of every matmul it
collects the parameters (and float buffers of rank >= 2) that the operand is computed
from with no activation in between: walking back from the operand through every op none
of whose value inputs is an activation (``_selection.Dependence``). Each such parameter
must be the matmul's weight operand as FindMatmuls recorded it. Anything else (a weight
scaled or added to before the matmul, two weights concatenated, a weight reduced over part
of an axis, an op the selection trace cannot replay, a matmul of two weights) would be
quantized on the fly as if it were an activation and be missing from the quantization
ratio: the pass raises ``WeightOperandError`` naming the parameter, the node and the op
chain. An embedding lookup (rows gathered by token id) is where activations begin, so a
table that is only looked up never reaches a matmul.

Matmuls inside the subgraphs of higher-order ops (a ``torch.no_grad`` region becomes
``wrap_with_set_grad_enabled``) are not annotated; one that multiplies by a weight of the
model is refused the same way, since that weight would stay unquantized and out of the ratio.

It also checks the total: the parameters the matmuls own (``params``) add up to the
elements of the distinct tensors the matmuls multiply by (a tied head and embedding once).
"""

from __future__ import annotations

import torch

from mpqc.graph import weight_tensor

from ._common import AnalysisError, AnalysisPass, PassResult, matmul_nodes
from ._selection import Dependence, op_name, trace_operand, value_inputs
from .costs import _storage_key


class WeightOperandError(AnalysisError):
    """A parameter reaches a matmul operand other than as that matmul's weight."""


def params_reaching(
    gm: torch.fx.GraphModule, operand, dep: Dependence, weights: dict[torch.fx.Node, str] | None = None
) -> list[tuple[str, tuple[torch.fx.Node, ...]]]:
    """(weight FQN, nodes from its get_attr to ``operand``) for every weight the operand is computed from.

    ``weights`` names the placeholders of a subgraph that stand for weights of the main graph."""
    weights = weights or {}
    if not isinstance(operand, torch.fx.Node):
        return []
    parent: dict[torch.fx.Node, torch.fx.Node | None] = {operand: None}
    queue, found = [operand], []
    while queue:
        node = queue.pop(0)
        if node in weights or (node.op == "get_attr" and weight_tensor(gm, node.target) is not None):
            chain, at = [], node
            while at is not None:
                chain.append(at)
                at = parent[at]
            found.append((weights.get(node, node.target), tuple(chain)))
            continue
        if node.op != "call_function" or dep.activation[node]:
            continue
        for source in value_inputs(node):
            if source not in parent:
                parent[source] = node
                queue.append(source)
    return found


def _describe(node: torch.fx.Node, pos: int) -> str:
    meta = node.meta["mpqc"]
    return f"matmul {meta.get('name', node.name)!r} (node {node.name!r}, {meta['op']}, operand {pos})"


def _violation(gm, node, pos, weight, chain, dep) -> str:
    meta = node.meta["mpqc"]
    ops = " -> ".join(op_name(n) for n in chain[1:]) or "(read as it is)"
    trace = trace_operand(gm, node.args[pos], dep)
    if trace is not None and trace.weight == weight:
        axis = meta["reduction_axes"][meta["operands"].index(pos)]
        why = trace.weight_axis(axis % node.args[pos].meta["val"].dim())[1]
    elif len(value_inputs(chain[-1])) > 1 or any(len(value_inputs(n)) > 1 for n in chain[1:]):
        why = "the operand is computed from this weight together with other tensors"
    else:
        why = "an op on the way is not a view, cast, copy or gather of the weight"
    recorded = meta["weight"] if meta["weight"] is not None else "none"
    return (
        f"{_describe(node, pos)} multiplies by parameter {weight!r} through {ops}, but FindMatmuls "
        f"did not find it as that matmul's weight operand (recorded weight: {recorded}): it would be "
        f"quantized on the fly like an activation and left out of the quantization ratio. Why: {why}. "
        "A weight operand must be the parameter's own elements (views, transposes, casts, copies, "
        "expert gathers) reduced along one whole axis of it"
    )


def _subgraph_inputs(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """(subgraph, {its placeholder: the node passed to it}) for each subgraph a higher-order op runs."""
    args = list(node.args)
    subs = [
        (i, a)
        for i, a in enumerate(args)
        if isinstance(a, torch.fx.Node)
        and a.op == "get_attr"
        and isinstance(getattr(gm, a.target, None), torch.fx.GraphModule)
    ]
    if not subs:
        return []
    flat = torch.utils._pytree.tree_flatten(args[subs[-1][0] + 1 :])[0]
    out = []
    for _, sub in subs:
        module = getattr(gm, sub.target)
        placeholders = module.graph.find_nodes(op="placeholder")
        out.append((module, sub.target, dict(zip(placeholders, flat)) if len(placeholders) == len(flat) else None))
    return out


def _check_subgraphs(gm: torch.fx.GraphModule, node: torch.fx.Node, dep: Dependence) -> None:
    from .find_matmuls import MATMUL_OPS

    for module, name, passed in _subgraph_inputs(gm, node):
        matmuls = [n for n in module.graph.nodes if n.op == "call_function" and str(n.target) in MATMUL_OPS]
        if not matmuls:
            continue
        if passed is None:
            raise WeightOperandError(
                f"cannot match the inputs of subgraph {name!r} of {node.name!r} to its "
                f"placeholders, so cannot tell whether its matmuls multiply by weights"
            )
        weights = {
            p: a.target
            for p, a in passed.items()
            if isinstance(a, torch.fx.Node) and a.op == "get_attr" and weight_tensor(gm, a.target) is not None
        }
        flags = {
            p: ((dep.on_input[a], dep.activation[a]) if isinstance(a, torch.fx.Node) else (False, False))
            for p, a in passed.items()
        }
        sub_dep = Dependence.of(module, flags)
        for matmul in matmuls:
            for operand in matmul.all_input_nodes:
                for weight, chain in params_reaching(module, operand, sub_dep, weights):
                    raise WeightOperandError(
                        f"matmul node {matmul.name!r} ({matmul.target}) inside subgraph {name!r} of "
                        f"{node.target} (node {node.name!r}, e.g. a torch.no_grad region) multiplies by parameter "
                        f"{weight!r} through {' -> '.join(op_name(n) for n in chain[1:]) or '(passed in as it is)'}; "
                        "mpqc annotates and quantizes the main graph only, so that weight would stay unquantized "
                        "and out of the quantization ratio. Run that code outside torch.no_grad (or "
                        "torch.set_grad_enabled) so its matmuls land in the main graph"
                    )


class CheckWeightOperands(AnalysisPass):
    """Raise unless every weight that reaches a matmul operand is that matmul's recorded weight."""

    needs = ("matmul", "name", "operands", "reduction_axes", "weight", "weight_operand", "params")

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        gm = graph_module
        dep = Dependence.of(gm)
        multiplied: dict[tuple, tuple[str, int]] = {}
        for node in matmul_nodes(gm):
            meta = node.meta["mpqc"]
            for pos in meta["operands"]:
                for weight, chain in params_reaching(gm, node.args[pos], dep):
                    if not (pos == meta["weight_operand"] and weight == meta["weight"]):
                        raise WeightOperandError(_violation(gm, node, pos, weight, chain, dep))
                    t = weight_tensor(gm, weight)
                    multiplied[_storage_key(t)] = (weight, t.numel())
        for node in gm.graph.nodes:
            _check_subgraphs(gm, node, dep)
        self._check_total(gm, multiplied)
        return PassResult(gm, False)

    @staticmethod
    def _check_total(gm: torch.fx.GraphModule, multiplied: dict[tuple, tuple[str, int]]) -> None:
        owned = sum(n.meta["mpqc"]["params"] for n in matmul_nodes(gm))
        expected = sum(numel for _, numel in multiplied.values())
        if owned != expected:
            raise WeightOperandError(
                f"the matmuls own {owned:,} weight elements, but the distinct tensors they multiply by hold "
                f"{expected:,} ({', '.join(sorted(w for w, _ in multiplied.values()))}); ComputeCosts should "
                "count each distinct tensor once"
            )
