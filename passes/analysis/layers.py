"""AssignLayers: the decoder layer each matmul belongs to, from ``nn_module_stack``."""

from __future__ import annotations

import torch

from ._common import AnalysisPass, PassResult, matmul_nodes, module_stack, mpqc_meta


def layer_of(node: torch.fx.Node) -> tuple[int | None, str | None]:
    """(layer index, layer module path) of the outermost module whose path ends in an index.

    Decoder layers live in a ModuleList, so their paths end in the list index:
    "model.layers.3", "transformer.h.3", "model.decoder.layers.3". The outermost one
    is the decoder layer even when experts inside it sit in a ModuleList of their own.
    Matmuls outside every layer (lm_head) get (None, None).
    """
    for path, _ in module_stack(node):
        last = path.rsplit(".", 1)[-1]
        if last.isdigit():
            return int(last), path
    return None, None


class AssignLayers(AnalysisPass):
    """Write ``layer`` (int or None) and ``layer_path`` (module path or None) on every matmul node."""

    needs = ("matmul",)
    provides = ("layer", "layer_path")

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        for node in matmul_nodes(graph_module):
            layer, path = layer_of(node)
            mpqc_meta(node).update(layer=layer, layer_path=path)
        return PassResult(graph_module, False)
