"""AssignRoles: what each matmul does (q_proj, down_proj, attention_scores, lm_head ...).

Weight matmuls get their role from the weight's owner (its FQN: "...self_attn.q_proj.weight"
-> "q_proj") and, for names that mean different things in different places (GPT-2's
``c_proj``, GPT-NeoX's ``dense``), from the enclosing module (attention or MLP) in
``nn_module_stack``. Activation-by-activation matmuls are told apart by the softmax
between them: Q @ K^T feeds a softmax (attention_scores); P @ V consumes one
(attention_values). The full list of roles is ``mpqc.graph.ROLES``.
"""

from __future__ import annotations

import torch

from ._common import AnalysisPass, PassResult, matmul_nodes, module_stack, mpqc_meta

# Owner name -> role, wherever it appears.
ROLE_BY_NAME = {
    "q_proj": "q_proj",
    "query": "q_proj",
    "k_proj": "k_proj",
    "key": "k_proj",
    "v_proj": "v_proj",
    "value": "v_proj",
    "o_proj": "o_proj",
    "out_proj": "o_proj",
    "qkv_proj": "qkv_proj",
    "c_attn": "qkv_proj",  # gpt2
    "query_key_value": "qkv_proj",  # gpt_neox, falcon, bloom
    "Wqkv": "qkv_proj",
    "W_pack": "qkv_proj",  # baichuan
    "gate_proj": "gate_proj",
    "up_proj": "up_proj",
    "down_proj": "down_proj",
    "gate_up_proj": "gate_up_proj",  # phi3
    "fc1": "up_proj",  # opt
    "c_fc": "up_proj",  # gpt2
    "dense_h_to_4h": "up_proj",  # gpt_neox
    "fc_in": "up_proj",
    "fc2": "down_proj",  # opt
    "dense_4h_to_h": "down_proj",  # gpt_neox
    "fc_out": "down_proj",
    "lm_head": "lm_head",
    "embed_out": "lm_head",
    "router": "router",
}
# Owner names whose role depends on the enclosing module: (in attention, in MLP).
ROLE_BY_CONTEXT = {
    "c_proj": ("o_proj", "down_proj"),  # gpt2
    "dense": ("o_proj", "down_proj"),  # gpt_neox attention.dense
    "proj": ("o_proj", "down_proj"),
}
_ATTENTION_NAMES = {"attn", "attention", "self_attn", "self_attention"}
_MLP_NAMES = {"mlp", "feed_forward", "ffn", "block_sparse_moe"}
_SOFTMAX_OPS = {"aten.softmax.int", "aten._softmax.default", "aten._safe_softmax.default"}


def _context(path: str, classes: dict[str, str]) -> str | None:
    """'attention', 'mlp' or 'moe' for a module path, from its name and class."""
    name, cls = path.rsplit(".", 1)[-1], classes.get(path, "")
    if "Moe" in cls or "MoE" in cls or "Sparse" in cls:
        return "moe"
    if name in _ATTENTION_NAMES or "Attention" in cls or "Attn" in cls:
        return "attention"
    if name in _MLP_NAMES or "MLP" in cls or "Mlp" in cls or "FeedForward" in cls:
        return "mlp"
    return None


def weight_role(weight: str, weight_rank: int, stack: list[tuple[str, str]]) -> str:
    """The role of a matmul by its weight's FQN and the modules that ran it."""
    parts = weight.split(".")
    # "...q_proj.weight" is owned by module q_proj; a stacked expert tensor
    # "...experts.gate_up_proj" is a parameter named for what it does.
    owner = parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]
    owner_path = ".".join(parts[:-1]) if parts[-1] == "weight" else weight
    parent_path = owner_path.rsplit(".", 1)[0] if "." in owner_path else ""
    classes = dict(stack)
    if weight_rank == 3 or "experts" in parts:
        return "expert"
    if "Router" in classes.get(owner_path, "") or (owner == "gate" and _context(parent_path, classes) == "moe"):
        return "router"
    if owner in ROLE_BY_NAME:
        return ROLE_BY_NAME[owner]
    if owner in ROLE_BY_CONTEXT:
        context = _context(parent_path, classes)
        if context == "attention":
            return ROLE_BY_CONTEXT[owner][0]
        if context in ("mlp", "moe"):
            return ROLE_BY_CONTEXT[owner][1]
    return "other"


def _reaches(start: torch.fx.Node, targets: set[str], *, forward: bool, depth: int) -> bool:
    """Whether an op in ``targets`` is within ``depth`` steps of ``start`` (users if forward, else args)."""
    frontier = [start]
    for _ in range(depth):
        step = []
        for n in frontier:
            step.extend(n.users if forward else (a for a in n.all_input_nodes))
        if any(n.op == "call_function" and str(n.target) in targets for n in step):
            return True
        frontier = step
    return False


def activation_role(node: torch.fx.Node) -> str:
    """attention_values (its first operand comes from a softmax), attention_scores (feeds one), or other.

    Values are checked first: P is a step or two from its softmax (a cast, dropout),
    while the forward walk from Q @ K^T passes scaling, softcapping and masking.
    """
    a = node.args[node.meta["mpqc"]["operands"][0]]
    if isinstance(a, torch.fx.Node) and (
        (a.op == "call_function" and str(a.target) in _SOFTMAX_OPS) or _reaches(a, _SOFTMAX_OPS, forward=False, depth=3)
    ):
        return "attention_values"
    if _reaches(node, _SOFTMAX_OPS, forward=True, depth=6):
        return "attention_scores"
    return "activation_matmul"


def _feeds_output(node: torch.fx.Node, depth: int = 4) -> bool:
    """Whether the node's value reaches the graph output through at most ``depth`` single-user steps."""
    for _ in range(depth):
        if any(u.op == "output" for u in node.users):
            return True
        if len(node.users) != 1:
            return False
        node = next(iter(node.users))
    return any(u.op == "output" for u in node.users)


class AssignRoles(AnalysisPass):
    """Write ``role`` (one of mpqc.graph.ROLES) on every matmul node."""

    needs = ("matmul", "weight", "weight_shape", "operands", "layer")
    provides = ("role",)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        for node in matmul_nodes(graph_module):
            meta = node.meta["mpqc"]
            if meta["weight"] is None:
                role = activation_role(node)
            else:
                role = weight_role(meta["weight"], len(meta["weight_shape"]), module_stack(node))
                # A head that multiplies by a weight named otherwise (e.g. the tied
                # embedding) is still the head if it makes the graph's output.
                if role == "other" and meta["layer"] is None and _feeds_output(node):
                    role = "lm_head"
            mpqc_meta(node)["role"] = role
        return PassResult(graph_module, False)
