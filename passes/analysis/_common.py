"""What the analysis passes share: the pass base class and readers of node metadata."""

from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = [
    "AnalysisError",
    "AnalysisPass",
    "PassResult",
    "input_placeholder",
    "matmul_nodes",
    "module_stack",
    "mpqc_meta",
    "shape_of",
]


class AnalysisError(ValueError):
    """An analysis pass found the graph in a state it cannot annotate."""


def mpqc_meta(node: torch.fx.Node) -> dict:
    """The node's ``meta["mpqc"]`` dict, created empty if absent: the only place analysis passes write."""
    return node.meta.setdefault("mpqc", {})


def matmul_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Nodes find_matmuls marked, in graph order."""
    return [n for n in gm.graph.nodes if n.meta.get("mpqc", {}).get("matmul")]


def module_stack(node: torch.fx.Node) -> list[tuple[str, str]]:
    """(module path, class name) from the outermost to the innermost module that ran this node."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        out.append((path, name.rsplit(".", 1)[-1]))
    return out


def shape_of(node) -> tuple | None:
    """The node's output shape as export recorded it (entries may be SymInts), or None."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def input_placeholder(gm: torch.fx.GraphModule) -> torch.fx.Node:
    """The input_ids placeholder: the graph's first (and, after capture, only) input."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    if not placeholders:
        raise AnalysisError("the graph has no placeholder; expected input_ids [batch, seq]")
    return placeholders[0]


class AnalysisPass(PassBase):
    """A pass that writes facts into ``node.meta["mpqc"]`` of matmul nodes and changes nothing else.

    ``needs`` lists meta keys that earlier passes must have written on every matmul
    node (checked in ``requires``); ``provides`` lists what this pass writes (checked
    in ``ensures``).
    """

    needs: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return type(self).__name__

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        if not self.needs:
            return
        nodes = matmul_nodes(graph_module)
        if not nodes:
            raise AnalysisError(
                f"{self.name} needs matmul nodes marked by FindMatmuls; none is marked: run FindMatmuls first"
            )
        self._check_keys(nodes, self.needs, "needs", "run the passes that write them first")

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        self._check_keys(matmul_nodes(graph_module), self.provides, "should have written", "this is a bug in the pass")

    def _check_keys(self, nodes, keys, verb, advice) -> None:
        for n in nodes:
            missing = [k for k in keys if k not in n.meta["mpqc"]]
            if missing:
                raise AnalysisError(
                    f"{self.name} {verb} meta['mpqc'] keys {missing} on matmul node {n.name!r}; {advice}"
                )

    def __call__(self, graph_module: torch.fx.GraphModule) -> PassResult:
        return super().__call__(graph_module)
