"""The captured, annotated graph: its matmuls, and components that group them.

A ``Graph`` is what ``mpqc.capture`` returns. Its ``module`` is a runnable
``torch.fx.GraphModule`` mapping ``input_ids`` (int64, [batch, seq]) to the logits
tensor ([batch, seq, vocab]); it returns the tensor itself, not a ``ModelOutput``.
The analysis passes write their facts into ``node.meta["mpqc"]`` of every matmul
node of ``module.graph``; ``Matmul`` is a frozen, read-only copy of those facts,
and ``Matmul.node`` names the node so that transform passes can find it again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

# Keys every matmul node's node.meta["mpqc"] holds once the analysis passes have run.
MATMUL_META_KEYS = (
    "matmul",  # True: this node multiplies two matrices (or batches of them)
    "name",  # readable unique name: "layers.3.self_attn.q_proj", "layers.3.attention_scores", "lm_head"
    "op",  # the node's target as text: "aten.linear.default"
    "role",  # see ROLES
    "layer",  # decoder layer index, or None outside the layers
    "layer_path",  # the decoder layer's module path in graph.module ("model.layers.3"), or None
    "operands",  # positions in node.args of the two multiplied tensors (a, b)
    "weight_operand",  # position in node.args of the operand that is (derived from) a weight, or None
    "weight",  # FQN of that weight in graph.module ("model.layers.3.self_attn.q_proj.weight"), or None
    "weight_shape",  # shape of the weight parameter itself, or None
    "weight_reduction_axis",  # axis of the weight parameter itself that the matmul reduces over, or None
    "weight_path",  # node names from the weight's get_attr to the weight operand (layout ops between), or None
    "reduction_axes",  # per operand (same order as "operands"): the reduced axis as the operand appears
    "params",  # weight elements this matmul owns (0 when it shares a weight an earlier matmul owns)
    "shares_weight_with",  # name of the earlier matmul owning the same weight, or None
    "macs_per_token",  # multiply-accumulates per input token at the reference batch and sequence length
    "reference_seq_len",  # the sequence length macs_per_token was counted at
    "components",  # {"matmul": component name, "layer": component name}
)

ROLES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",  # fused q/k/v: phi3 qkv_proj, gpt2 c_attn, gpt_neox query_key_value
    "o_proj",  # attention output: o_proj, out_proj (opt), attention dense (gpt_neox), attn.c_proj (gpt2)
    "gate_proj",
    "up_proj",  # also the up projection of non-gated MLPs: fc1 (opt), c_fc (gpt2), dense_h_to_4h
    "gate_up_proj",  # fused gate and up: phi3
    "down_proj",  # also fc2 (opt), mlp.c_proj (gpt2), dense_4h_to_h (gpt_neox)
    "router",  # mixture-of-experts router (gate)
    "expert",  # matmul over stacked [num_experts, ...] expert weights
    "attention_scores",  # Q @ K^T
    "attention_values",  # P @ V
    "lm_head",
    "activation_matmul",  # another matmul of two activations
    "other",  # a weight matmul whose role the names do not tell
)

GRANULARITIES = ("matmul", "layer")

# node.meta key marking the quantize nodes InsertQuantizers adds (read by compile and export).
QUANTIZER_META = "mpqc_quantizer"


def weight_tensor(gm: torch.fx.GraphModule, target: str) -> torch.Tensor | None:
    """The tensor at ``target`` if it is a weight: a float parameter or buffer of rank >= 2."""
    try:
        t = gm.get_parameter(target)
    except AttributeError:
        try:
            t = gm.get_buffer(target)
        except AttributeError:
            return None
    return t if t.is_floating_point() and t.dim() >= 2 else None


@dataclasses.dataclass(frozen=True)
class Matmul:
    """One matrix multiplication of the captured graph (a frozen copy of its node's meta)."""

    name: str
    node: str  # fx node name in graph.module.graph
    op: str
    role: str
    layer: int | None
    layer_path: str | None
    weight: str | None
    weight_shape: tuple[int, ...] | None
    weight_operand: int | None
    weight_reduction_axis: int | None
    weight_path: tuple[str, ...] | None  # get_attr node, layout ops, ..., the weight operand node
    operands: tuple[int, int]
    reduction_axes: tuple[int, int]
    params: int
    shares_weight_with: str | None
    macs_per_token: int
    reference_seq_len: int
    components: tuple[tuple[str, str], ...]  # (granularity, component name) pairs

    @property
    def has_weight(self) -> bool:
        return self.weight is not None

    def component(self, granularity: str) -> str:
        """The name of the component this matmul belongs to at a standard granularity."""
        for g, name in self.components:
            if g == granularity:
                return name
        raise KeyError(f"unknown granularity {granularity!r}; valid: {', '.join(g for g, _ in self.components)}")

    @classmethod
    def from_node(cls, node: torch.fx.Node) -> Matmul:
        meta = node.meta.get("mpqc")
        if not meta or not meta.get("matmul"):
            raise ValueError(f"node {node.name!r} is not an annotated matmul (run the analysis passes first)")
        missing = [k for k in MATMUL_META_KEYS if k not in meta]
        if missing:
            raise ValueError(f"matmul node {node.name!r} lacks meta keys {missing}; run all analysis passes")
        return cls(
            name=meta["name"],
            node=node.name,
            op=meta["op"],
            role=meta["role"],
            layer=meta["layer"],
            layer_path=meta["layer_path"],
            weight=meta["weight"],
            weight_shape=meta["weight_shape"],
            weight_operand=meta["weight_operand"],
            weight_reduction_axis=meta["weight_reduction_axis"],
            weight_path=meta["weight_path"],
            operands=tuple(meta["operands"]),
            reduction_axes=tuple(meta["reduction_axes"]),
            params=meta["params"],
            shares_weight_with=meta["shares_weight_with"],
            macs_per_token=meta["macs_per_token"],
            reference_seq_len=meta["reference_seq_len"],
            components=tuple(meta["components"].items()),
        )


@dataclasses.dataclass(frozen=True)
class Component:
    """Matmuls that share one precision choice."""

    name: str
    granularity: str
    layer: int | None  # the layer all its matmuls belong to, or None if outside the layers or mixed
    matmuls: tuple[Matmul, ...]

    def __post_init__(self):
        if not self.matmuls:
            raise ValueError(f"component {self.name!r} has no matmuls")

    @property
    def params(self) -> int:
        return sum(m.params for m in self.matmuls)

    @property
    def macs(self) -> int:
        """Multiply-accumulates per token at the graph's reference sequence length."""
        return sum(m.macs_per_token for m in self.matmuls)


Granularity = str | Callable[[Matmul], str]


def group_components(matmuls: Sequence[Matmul], granularity: Granularity) -> tuple[Component, ...]:
    """Group matmuls into components, in graph order of each component's first matmul.

    ``granularity`` is "matmul" (each matmul alone), "layer" (all matmuls of one
    decoder layer together, and one component per matmul outside the layers), or a
    callable mapping a ``Matmul`` to its group's name.
    """
    if callable(granularity):
        label = f"custom:{getattr(granularity, '__name__', type(granularity).__name__)}"

        def key(m: Matmul) -> str:
            group = granularity(m)
            if not isinstance(group, str) or not group:
                raise TypeError(
                    f"granularity callable {label} returned {group!r} for matmul {m.name!r}; "
                    "it must return a non-empty group name (str)"
                )
            return group

    elif granularity in GRANULARITIES:
        label = granularity

        def key(m: Matmul) -> str:
            return m.component(granularity)

    else:
        raise ValueError(
            f"unknown granularity {granularity!r}; valid: {', '.join(map(repr, GRANULARITIES))} "
            "or a callable Matmul -> group name"
        )
    groups: dict[str, list[Matmul]] = {}
    for m in matmuls:
        groups.setdefault(key(m), []).append(m)
    components = []
    for name, members in groups.items():
        layers = {m.layer for m in members}
        layer = layers.pop() if len(layers) == 1 else None
        components.append(Component(name=name, granularity=label, layer=layer, matmuls=tuple(members)))
    return tuple(components)


class Graph:
    """A captured causal LM: the exported program, a runnable module, and its annotated matmuls.

    ``module`` maps ``input_ids`` (int64 [batch, seq]) to logits ([batch, seq, vocab]),
    returned as a plain tensor. It shares parameters with the model it was captured
    from: never modify them in place. ``exported_program`` is the program as exported,
    before attention was decomposed; ``module`` carries the decomposition and the
    annotations.
    """

    def __init__(
        self,
        exported_program: torch.export.ExportedProgram,
        module: torch.fx.GraphModule,
        *,
        reference_seq_len: int,
        reference_batch_size: int,
        model_class: str,
        config=None,
    ):
        self.exported_program = exported_program
        self.config = config  # the model's Hugging Face config (None for other modules): what exports read
        self.module = module
        self.reference_seq_len = reference_seq_len
        self.reference_batch_size = reference_batch_size
        self.model_class = model_class
        self.matmuls: tuple[Matmul, ...] = tuple(
            Matmul.from_node(n) for n in module.graph.nodes if n.meta.get("mpqc", {}).get("matmul")
        )
        if not self.matmuls:
            raise ValueError(f"{model_class}: the captured graph has no annotated matmuls")
        self._by_name = {m.name: m for m in self.matmuls}
        if len(self._by_name) != len(self.matmuls):
            raise ValueError(f"{model_class}: matmul names are not unique")
        # torch.export bakes the capture's device and dtype into the graph (aranges made on
        # that device, dtype assertions), so the graph runs only there, in that dtype.
        first = next((p for p in module.parameters() if p.is_floating_point()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.dtype = first.dtype if first is not None else torch.float32

    def __iter__(self) -> Iterator[Matmul]:
        return iter(self.matmuls)

    def __len__(self) -> int:
        return len(self.matmuls)

    def matmul(self, name: str) -> Matmul:
        try:
            return self._by_name[name]
        except KeyError:
            close = [n for n in self._by_name if name in n][:5]
            hint = f"; names containing it: {close}" if close else ""
            raise KeyError(f"no matmul named {name!r} in {self.model_class}{hint}") from None

    def node(self, matmul: Matmul | str) -> torch.fx.Node:
        """The fx node of a matmul in ``module.graph``."""
        node_name = matmul.node if isinstance(matmul, Matmul) else self.matmul(matmul).node
        for n in self.module.graph.nodes:
            if n.name == node_name:
                return n
        raise KeyError(f"node {node_name!r} is no longer in graph.module.graph")

    def components(self, granularity: Granularity = "matmul") -> tuple[Component, ...]:
        return group_components(self.matmuls, granularity)

    @property
    def total_params(self) -> int:
        """Weight elements multiplied by all matmuls (each weight counted once)."""
        return sum(m.params for m in self.matmuls)

    @property
    def total_macs_per_token(self) -> int:
        return sum(m.macs_per_token for m in self.matmuls)

    @property
    def num_layers(self) -> int:
        return len({m.layer for m in self.matmuls if m.layer is not None})

    def summary(self) -> str:
        """A table of every matmul: name, role, layer, op, weight shape, params, MACs per token."""
        header = ("name", "role", "layer", "op", "weight", "params", "MACs/token")
        rows = [
            (
                m.name,
                m.role,
                "-" if m.layer is None else str(m.layer),
                m.op.removeprefix("aten.").removesuffix(".default"),
                "x".join(map(str, m.weight_shape)) if m.weight_shape else "-",
                f"{m.params:,}",
                f"{m.macs_per_token:,}",
            )
            for m in self.matmuls
        ]
        rows.append(("total", "", "", "", "", f"{self.total_params:,}", f"{self.total_macs_per_token:,}"))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        numeric = {5, 6}

        def fmt(row):
            return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

        lines = [
            f"{self.model_class}: {len(self.matmuls)} matmuls, {self.num_layers} layers, "
            f"MACs at reference seq len {self.reference_seq_len}",
            fmt(header),
            fmt(tuple("-" * w for w in widths)),
            *(fmt(r) for r in rows),
        ]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"Graph({self.model_class}, matmuls={len(self.matmuls)}, layers={self.num_layers}, "
            f"params={self.total_params:,}, reference_seq_len={self.reference_seq_len})"
        )

    def to_dict(self) -> dict[str, Any]:
        """Machine-readable description (JSON-serializable)."""
        return {
            "model_class": self.model_class,
            "reference_seq_len": self.reference_seq_len,
            "reference_batch_size": self.reference_batch_size,
            "total_params": self.total_params,
            "matmuls": [dataclasses.asdict(m) for m in self.matmuls],
        }
