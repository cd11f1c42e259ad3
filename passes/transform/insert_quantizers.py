"""InsertQuantizers: put a quantizer on every operand of every annotated matmul.

Weights: a ``WeightQuantizer`` between the weight's ``get_attr`` and the first node on its
way into the matmul (through views such as ``t``/``transpose``), quantizing the parameter
itself along its own reduction axis, from a cache. Activations: one
``ActivationQuantizer`` per (activation node, reduction axis), returning a tuple with one
slot per consuming matmul, so matmuls that read the same input in the same format share
one quantize call. The quantizers start unconfigured (they pass values through);
``QuantizedModel.set_plan`` gives them formats. Matmul annotations stay as they were.
"""

from __future__ import annotations

import operator
import re

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from mpqc.graph import QUANTIZER_META, Graph
from mpqc.quantizers import ActivationQuantizer, WeightCache, WeightQuantizer


def _module_name(prefix: str, name: str) -> str:
    return f"{prefix}_{re.sub(r'[^0-9A-Za-z_]', '_', name)}"


def _weight_edge(node: torch.fx.Node, m, nodes: dict) -> tuple[torch.fx.Node, torch.fx.Node]:
    """(get_attr node of the weight, the node that consumes it on the way into ``node``).

    The analysis recorded that way as ``weight_path`` (get_attr first, the operand last):
    through views, transposes and MoE expert gathers."""
    path = [nodes[name] for name in m.weight_path]
    if not path or path[0].op != "get_attr":
        raise ValueError(f"matmul {m.name!r}: its weight path {m.weight_path} does not start at a parameter")
    return path[0], (path[1] if len(path) > 1 else node)


class InsertQuantizers(PassBase):
    """Insert weight and activation quantizers for the matmuls of ``graph`` into ``graph_module``.

    ``graph_module`` has the same nodes as ``graph.module`` (a copy of its graph). After the
    pass, ``self.weight_quantizers`` maps matmul names to their WeightQuantizer, and
    ``self.activation_quantizers`` lists (quantizer, [(slot, matmul name)]).
    """

    def __init__(self, graph: Graph, cache: WeightCache):
        super().__init__()
        self.graph = graph
        self.cache = cache
        self.weight_quantizers: dict[str, WeightQuantizer] = {}
        self.activation_quantizers: list[ActivationQuantizer] = []

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        if any(n.meta.get(QUANTIZER_META) for n in graph_module.graph.nodes):
            raise ValueError("the graph already has quantizers; compile from the captured graph, not a compiled one")

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        g = graph_module.graph
        nodes = {n.name: n for n in g.nodes}
        act_uses: dict[tuple[str, int], list[tuple[torch.fx.Node, int, str]]] = {}
        for m in self.graph.matmuls:
            node = nodes[m.node]
            for pos, axis in zip(m.operands, m.reduction_axes):
                if pos == m.weight_operand:
                    self._insert_weight(graph_module, node, m, nodes)
                else:
                    act_uses.setdefault((node.args[pos].name, axis), []).append((node, pos, m.name))
        order = {n: i for i, n in enumerate(g.nodes)}
        for (source_name, axis), uses in act_uses.items():
            self._insert_activation(graph_module, nodes[source_name], axis, uses, order)
        g.lint()
        graph_module.recompile()
        return PassResult(graph_module, True)

    def _insert_weight(self, gm, node, m, nodes) -> None:
        get_attr, consumer = _weight_edge(node, m, nodes)
        quantizer = WeightQuantizer(m.weight, m.weight_reduction_axis, self.cache)
        target = _module_name("mpqc_wq", m.name)
        gm.add_submodule(target, quantizer)
        with gm.graph.inserting_after(get_attr):
            q = gm.graph.call_module(target, (get_attr,))
        q.meta[QUANTIZER_META] = {"kind": "weight", "matmul": m.name, "weight": m.weight}
        q.meta["val"] = get_attr.meta.get("val")
        consumer.replace_input_with(get_attr, q)
        self.weight_quantizers[m.name] = quantizer

    def _insert_activation(self, gm, source, axis, uses, order) -> None:
        quantizer = ActivationQuantizer(axis, tuple(name for _, _, name in uses), device=self.graph.device)
        target = _module_name("mpqc_aq", f"{source.name}_axis{axis}")
        gm.add_submodule(target, quantizer)
        first_use = min((n for n, _, _ in uses), key=order.__getitem__)
        with gm.graph.inserting_before(first_use):
            q = gm.graph.call_module(target, (source,))
            q.meta[QUANTIZER_META] = {
                "kind": "activation",
                "source": source.name,
                "axis": axis,
                "matmuls": [name for _, _, name in uses],
            }
            for slot, (node, pos, name) in enumerate(uses):
                item = gm.graph.call_function(operator.getitem, (q, slot))
                item.meta[QUANTIZER_META] = {"kind": "activation_slot", "matmul": name}
                item.meta["val"] = source.meta.get("val")
                node.update_arg(pos, item)
        self.activation_quantizers.append(quantizer)
