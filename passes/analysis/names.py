"""NameMatmuls: a readable, unique name for every matmul.

- a weight matmul is named for its weight: "layers.3.self_attn.q_proj" (the module
  owning ``.weight``), "layers.0.mlp.experts.gate_up_proj" (a stacked expert tensor);
- the head is "lm_head", even when it multiplies by the tied embedding;
- an activation matmul is named for its layer and role: "layers.3.attention_scores".

Names drop the base-model prefix ("model.", "transformer.", "gpt_neox."), so a llama
layer reads "layers.3..." and a GPT-2 layer "h.3...". Two matmuls that would share a
name (one module called twice) get "#1", "#2" ... appended in graph order.
"""

from __future__ import annotations

import torch

from ._common import AnalysisPass, PassResult, matmul_nodes, module_stack, mpqc_meta


def infer_prefix(layer_paths: list[str]) -> str:
    """The base-model prefix: the first component of every decoder layer path, when the layers
    sit below one (``model.layers.3`` -> "model"; ``layers.3`` -> "")."""
    firsts = {p.split(".", 1)[0] for p in layer_paths if p.count(".") >= 2}
    if len(firsts) == 1 and all(p.count(".") >= 2 for p in layer_paths):
        return firsts.pop()
    return ""


class NameMatmuls(AnalysisPass):
    """Write ``name`` on every matmul node.

    ``prefix`` is the base-model attribute to drop from names ("model" for Llama,
    "transformer" for GPT-2); None infers it from the decoder layer paths.
    """

    needs = ("matmul", "weight", "role", "layer_path")
    provides = ("name",)

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        nodes = matmul_nodes(graph_module)
        prefix = self.prefix
        if prefix is None:
            prefix = infer_prefix([n.meta["mpqc"]["layer_path"] for n in nodes if n.meta["mpqc"]["layer_path"]])

        def strip(path: str) -> str:
            return path[len(prefix) + 1 :] if prefix and path.startswith(prefix + ".") else path

        seen: dict[str, int] = {}
        for node in nodes:
            name = strip(self._base_name(node))
            count = seen.get(name, 0)
            seen[name] = count + 1
            mpqc_meta(node)["name"] = name if count == 0 else f"{name}#{count}"
        return PassResult(graph_module, False)

    @staticmethod
    def _base_name(node: torch.fx.Node) -> str:
        meta = node.meta["mpqc"]
        stack = module_stack(node)
        innermost = stack[-1][0] if stack else ""
        if meta["role"] == "lm_head":
            return innermost if innermost.rsplit(".", 1)[-1] in ("lm_head", "embed_out") else "lm_head"
        weight = meta["weight"]
        if weight is not None:
            return weight.removesuffix(".weight")
        # Activation matmuls: the layer is what makes them unique; fall back to the module.
        where = meta["layer_path"] or innermost
        return f"{where}.{meta['role']}" if where else meta["role"]
