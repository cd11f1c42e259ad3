"""AssignComponents: the component each matmul belongs to at the standard granularities.

- "matmul": every matmul is its own component, named like the matmul;
- "layer": all matmuls of one decoder layer form one component, named for the layer
  ("layers.3"); a matmul outside the layers (lm_head) is a component of its own.

Grouping by a user's callable needs no annotation: ``Graph.components(fn)`` groups
the frozen ``Matmul`` records directly (``mpqc.graph.group_components``).
"""

from __future__ import annotations

import torch

from ._common import AnalysisPass, PassResult, matmul_nodes, mpqc_meta


def layer_component_name(matmul_name: str, layer_path: str | None) -> str:
    """The "layer" component of a matmul: its layer's path as the name spells it, or its own name.

    Names drop the base-model prefix ("model.layers.3" -> "layers.3"), so the layer's
    name is the longest tail of ``layer_path`` that starts ``matmul_name``.
    """
    if layer_path is None:
        return matmul_name
    parts = layer_path.split(".")
    for i in range(len(parts)):
        tail = ".".join(parts[i:])
        if matmul_name == tail or matmul_name.startswith(tail + "."):
            return tail  # equal: the indexed module is the matmul itself (a ModuleList of Linear)
    raise ValueError(f"matmul name {matmul_name!r} does not start with (a tail of) its layer path {layer_path!r}")


class AssignComponents(AnalysisPass):
    """Write ``components`` = {"matmul": name, "layer": name} on every matmul node."""

    needs = ("matmul", "name", "layer_path")
    provides = ("components",)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        for node in matmul_nodes(graph_module):
            meta = mpqc_meta(node)
            meta["components"] = {
                "matmul": meta["name"],
                "layer": layer_component_name(meta["name"], meta["layer_path"]),
            }
        return PassResult(graph_module, False)
