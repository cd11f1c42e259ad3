"""How a parameter reaches a matmul operand, and where its axes end up there.

A matmul multiplies by a weight when its operand is the weight's own elements,
rearranged: viewed, transposed in any spelling, broadcast, sliced, gathered by expert
ids, cast or copied. ``trace_operand`` follows an operand back to a parameter through
ops with one floating-point input, then replays those ops forward on a *virtual weight*:
a meta tensor with the weight's shape and contiguous strides, whose strides after every
op say which weight elements each operand element is. An op is a selection by what it
does, not by its name:

- a view: replayed on the virtual weight, its result aliases it, with the same dtype and
  no negation or conjugation bit (t, numpy_T, mT, transpose, permute, view, expand,
  unsqueeze, slice, select, split ... qualify without being listed);
- a view-copy (ATen's ``view_copy`` tag, and ``_unsafe_view``): the copying twin of a
  view, replayed as that view;
- a cast or copy: the same shape out as in, no tensor or size argument besides the input,
  and on a probe of distinct values (tiny and huge, both signs) it returns the probe cast
  to its output dtype (clone, contiguous, _to_copy, to, lift_fresh_copy, eval dropout ...);
- a gather by integer indices (index.Tensor, index_select, embedding). Its gathered axes
  are index axes. A gather that keeps two of the table's axes as its last two (MoE
  experts gathered by id) selects whole matrices; one that does not (an embedding
  lookup, rows gathered by token id) is a *lookup*: when its indices depend on the model
  input its result is an activation, not the table.

Anything else (arithmetic, reductions, concatenation) ends the selection: the operand
is then computed from the parameter, not the parameter itself, and
CheckWeightOperands reports it.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch

from mpqc.graph import weight_tensor

aten = torch.ops.aten

# Gathers by integer indices: (position of the table in args).
GATHER_OPS = {aten.index.Tensor: 0, aten.index_select.default: 0, aten.embedding.default: 0}
# Argument types a cast or copy may take besides its input (no sizes, dims or tensors).
_CAST_ARG_TYPES = ("ScalarType", "Layout", "Device", "bool", "MemoryFormat", "float", "number", "str")
_PROBE = (0.0, 1.0, -2.0, 0.5, -0.375, 3.0, -7.0, 1e-3, -1e3, 6e4, -1e30, 1e30)
_MAX_CHAIN = 64


# ---- what a node's inputs are --------------------------------------------------------------


def _carries_values(val) -> bool:
    if isinstance(val, torch.Tensor):
        return val.is_floating_point() or val.is_complex()
    if isinstance(val, (tuple, list)):
        return any(_carries_values(v) for v in val)
    return False


def value_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The inputs whose elements can flow into the node's output: floating-point tensors.

    Integer and boolean tensors are indices or masks, SymInts are sizes."""
    return [n for n in node.all_input_nodes if _carries_values(n.meta.get("val"))]


def _is_weight_read(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    return node.op == "get_attr" and weight_tensor(gm, node.target) is not None


def gather_table_axes(node: torch.fx.Node) -> list[bool] | None:
    """For a gather node, per output axis: whether it is an axis of the table (else an index axis)."""
    table = node.args[0]
    rank = len(table.meta["val"].shape)
    if node.target is aten.embedding.default:
        return [False] * node.args[1].meta["val"].dim() + [True]
    if node.target is aten.index_select.default:
        dim = node.args[1] % rank
        return [d != dim for d in range(rank)]
    if node.target is aten.index.Tensor:
        indices = list(node.args[1]) + [None] * (rank - len(node.args[1]))
        at = [d for d, t in enumerate(indices) if t is not None]
        if any(indices[d].meta["val"].dtype == torch.bool for d in at):
            return None  # a boolean mask: not modelled
        b = len(torch.broadcast_shapes(*(indices[d].meta["val"].shape for d in at)))
        kept = [True] * (rank - len(at))
        if at == list(range(at[0], at[-1] + 1)):  # adjacent index dims: the index axes replace them
            return kept[: at[0]] + [False] * b + kept[at[0] :]
        return [False] * b + kept
    return None


def is_lookup(node: torch.fx.Node) -> bool:
    """A gather whose result does not keep two table axes as its last two axes: rows, not matrices."""
    if node.op != "call_function" or node.target not in GATHER_OPS:
        return False
    axes = gather_table_axes(node)
    return axes is None or len(axes) < 2 or not (axes[-1] and axes[-2])


@dataclasses.dataclass
class Dependence:
    """Per node: whether it depends on the model input at all, and whether its values are activations.

    Activation values enter through placeholders and through lookups whose indices depend on
    the input (token embeddings); every op with an activation among its value inputs passes
    them on. A gather of whole expert matrices by input-dependent ids stays parameter values."""

    on_input: dict[torch.fx.Node, bool]
    activation: dict[torch.fx.Node, bool]

    @classmethod
    def of(cls, gm: torch.fx.GraphModule, placeholders: dict[torch.fx.Node, tuple[bool, bool]] | None = None):
        """``placeholders``: (on_input, activation) for placeholders that are not the model input
        (those of a higher-order op's subgraph); the rest are the model input."""
        on_input, activation = {}, {}
        for n in gm.graph.nodes:
            inputs = n.all_input_nodes
            if n.op == "placeholder":
                on_input[n], activation[n] = (placeholders or {}).get(n, (True, True))
                continue
            on_input[n] = any(on_input[i] for i in inputs)
            if is_lookup(n):
                activation[n] = any(on_input[i] for i in inputs if i is not n.args[0])
            else:
                activation[n] = any(activation[i] for i in value_inputs(n))
        return cls(on_input, activation)


# ---- the trace ---------------------------------------------------------------------------


class _NotASelection(Exception):
    """An op on the way from a parameter to an operand that is not a selection (the reason)."""


@dataclasses.dataclass(frozen=True)
class Trace:
    """An operand's way back to a weight: the nodes from the weight's get_attr to the operand.

    ``view`` is the virtual weight after the whole chain (a meta tensor shaped like the
    operand), or None when an op on the way is not a selection; ``reason`` then says which.
    ``index_axes`` maps the strides given to index axes to whether their indices depend on
    the model input (data) or not (a constant selection)."""

    weight: str
    nodes: tuple[torch.fx.Node, ...]
    weight_shape: tuple[int, ...]
    view: torch.Tensor | None
    index_axes: dict[int, bool]
    reason: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes)

    def weight_axis(self, axis: int) -> tuple[int | None, str | None]:
        """The weight axis that ``axis`` of the operand runs along, whole and in order, or (None, why not)."""
        return _whole_weight_axis(self, axis)


def op_name(node: torch.fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    return str(node.target) if node.op == "call_function" else f"{node.op} {node.target}"


def _chain_back(gm, operand, dep: Dependence) -> list[torch.fx.Node] | None:
    """Nodes from a weight's get_attr to ``operand`` through ops with one value input, or None."""
    chain, node = [], operand
    for _ in range(_MAX_CHAIN):
        if not isinstance(node, torch.fx.Node):
            return None
        chain.append(node)
        if _is_weight_read(gm, node):
            return chain[::-1]
        if node.op != "call_function" or dep.activation.get(node, True):
            return None
        sources = value_inputs(node)
        if len(sources) != 1:
            return None
        node = sources[0]
    return None


def trace_operand(gm: torch.fx.GraphModule, operand, dep: Dependence) -> Trace | None:
    """Follow ``operand`` back to the weight it is made from, or None if it is not made from one."""
    chain = _chain_back(gm, operand, dep)
    if chain is None:
        return None
    weight = weight_tensor(gm, chain[0].target)
    shape = tuple(weight.shape)
    view = torch.empty(shape, device="meta", dtype=weight.dtype)
    index_axes: dict[int, bool] = {}
    try:
        for node in chain[1:]:
            view = _replay(node, view, index_axes, dep, _extent(shape))
    except _NotASelection as e:
        return Trace(chain[0].target, tuple(chain), shape, None, index_axes, str(e))
    return Trace(chain[0].target, tuple(chain), shape, view, index_axes)


def _extent(shape) -> int:
    return max(math.prod(shape), 1)


# ---- replaying one op on the virtual weight --------------------------------------------------


def _concrete(value, what: torch.fx.Node):
    """A node's argument with sizes made concrete (symbolic sizes at the example's values)."""
    if isinstance(value, torch.fx.Node):
        return _concrete(value.meta.get("val"), what)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        hint = value.node.hint
        if hint is None:
            raise _NotASelection(f"{op_name(what)} takes a size without a known value ({value})")
        return hint
    if isinstance(value, torch.Tensor):
        raise _NotASelection(f"{op_name(what)} takes a tensor besides the weight")
    return value


def _call(node, source: torch.fx.Node, replacement, target=None):
    """Run the node's op (or ``target``) with ``replacement`` for ``source`` and concrete sizes."""

    def value(a):
        return replacement if a is source else _concrete(a, node)

    args = torch.fx.node.map_aggregate(node.args, value)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, value)
    return (target or node.target)(*args, **kwargs)


def _replay(node, view, index_axes, dep: Dependence, extent: int):
    if node.target is operator.getitem:
        if not isinstance(view, (list, tuple)):
            raise _NotASelection("getitem on a single tensor")
        return view[node.args[1]]
    if not isinstance(node.target, torch._ops.OpOverload):
        raise _NotASelection(f"{op_name(node)} is not an ATen op this trace can replay")
    if node.target in GATHER_OPS:
        return _replay_gather(node, view, index_axes, dep, extent)
    source = value_inputs(node)[0]
    for attempt in (_as_view, _as_view_copy, _as_cast):
        out = attempt(node, source, view)
        if out is not None:
            _check_shape(node, out)
            return out
    raise _NotASelection(f"{op_name(node)} is not a view, cast, copy or gather of the weight")


def _check_shape(node, out) -> None:
    want = node.meta["val"]
    pairs = zip(out, want) if isinstance(out, (list, tuple)) else [(out, want)]
    for got, expected in pairs:
        if tuple(got.shape) != tuple(_concrete(s, node) for s in expected.shape):
            raise _NotASelection(
                f"{op_name(node)} replayed on the weight gives shape {tuple(got.shape)}, "
                f"the graph recorded {tuple(expected.shape)}"
            )


def _aliases(out, view) -> bool:
    outs = out if isinstance(out, (list, tuple)) else [out]
    return all(
        isinstance(o, torch.Tensor)
        and torch._C._is_alias_of(o, view)
        and o.dtype == view.dtype
        and not o.is_neg()
        and not o.is_conj()
        for o in outs
    )


def _physical(node) -> bool:
    """Views that take explicit strides: meaningful only on the weight's own layout."""
    return any(a.name in ("stride", "storage_offset") for a in node.target._schema.arguments)


def _as_view(node, source, view):
    returns = node.target._schema.returns
    if not returns or returns[0].alias_info is None or returns[0].alias_info.is_write:
        return None
    if _physical(node) and tuple(source.meta["val"].stride()) != tuple(view.stride()):
        raise _NotASelection(f"{op_name(node)} takes strides, and the weight was copied to another layout first")
    try:
        out = _call(node, source, view)
    except RuntimeError as e:
        if "view" in node.target._schema.name or "reshape" in node.target._schema.name:
            raise _NotASelection(
                f"{op_name(node)} merges weight axes that are not adjacent in the parameter ({str(e).splitlines()[0]})"
            ) from None
        return None
    return out if _aliases(out, view) else None


def _as_view_copy(node, source, view):
    name = node.target._schema.name.removeprefix("aten::")
    if name == "_unsafe_view":
        twin = aten.view.default
    elif torch.Tag.view_copy in node.target.tags and name.endswith("_copy"):
        packet = getattr(aten, name.removesuffix("_copy"), None)
        twin = getattr(packet, node.target._overloadname, None) if packet is not None else None
        if twin is None:
            return None
    else:
        return None
    try:
        out = _call(node, source, view, target=twin)
    except RuntimeError as e:
        raise _NotASelection(
            f"{op_name(node)} merges weight axes that are not adjacent in the parameter ({str(e).splitlines()[0]})"
        ) from None
    return out if _aliases(out, view) else None


def _as_cast(node, source, view):
    """``view`` itself if the op is a cast or copy: its elements stay where they are."""
    schema = node.target._schema
    if len(node.all_input_nodes) != 1 or len(schema.returns) != 1:
        return None
    if any(
        str(a.real_type).removeprefix("Optional[").removesuffix("]") not in _CAST_ARG_TYPES
        for a in schema.arguments[1:]
    ):
        return None
    val = node.meta["val"]
    if not isinstance(val, torch.Tensor) or tuple(val.shape) != tuple(source.meta["val"].shape):
        return None
    return view if _preserves_values(node, source) else None


def _preserves_values(node, source) -> bool:
    dtype = source.meta["val"].dtype
    limit = torch.finfo(dtype).max if dtype.is_floating_point else float("inf")
    values = [v for v in _PROBE if abs(v) <= limit]
    probe = torch.tensor(values, dtype=torch.float64).to(dtype).reshape(-1, *[1] * (source.meta["val"].dim() - 1))
    if source.meta["val"].dim() == 0:
        return False

    def cpu(a):
        return torch.device("cpu") if isinstance(a, torch.device) else a

    try:
        node_cpu = _Shim(node, cpu)
        out = _call(node_cpu, source, probe)
    except Exception:  # noqa: BLE001 - an op that cannot run on the probe is not shown to be a cast
        return False
    if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
        return False
    expected = probe.to(out.dtype)
    same = (out == expected) | (out.isnan() & expected.isnan())
    return bool(same.all())


class _Shim:
    """A node with its device arguments moved to the CPU, for probing."""

    def __init__(self, node, fn):
        self.target = node.target
        self.args = torch.fx.node.map_aggregate(node.args, fn)
        self.kwargs = {k: fn(v) for k, v in node.kwargs.items()}
        self.meta = node.meta
        self.op, self.name = node.op, node.name


def _replay_gather(node, view, index_axes, dep: Dependence, extent: int):
    axes = gather_table_axes(node)
    if axes is None:
        raise _NotASelection(f"{op_name(node)} selects by a boolean mask")
    table_dims = _gathered_table_dims(node, view.dim())
    data = any(dep.on_input[i] for i in node.all_input_nodes if i is not node.args[0])
    shape = [_concrete(s, node) for s in node.meta["val"].shape]
    strides, kept = [], iter(d for d in range(view.dim()) if d not in table_dims)
    for is_table in axes:
        if is_table:
            strides.append(view.stride(next(kept)))
        else:
            stride = extent * (len(index_axes) + 1)
            index_axes[stride] = data
            strides.append(stride)
    offset = view.storage_offset()
    span = offset + sum((n - 1) * s for n, s in zip(shape, strides)) + 1
    return torch.empty(span, device="meta", dtype=view.dtype).as_strided(shape, strides, offset)


def _gathered_table_dims(node, rank: int) -> set[int]:
    if node.target is aten.embedding.default:
        return {0}
    if node.target is aten.index_select.default:
        return {node.args[1] % rank}
    return {d for d, t in enumerate(node.args[1]) if t is not None}


# ---- which weight axis an operand axis is ------------------------------------------------------


def _whole_weight_axis(trace: Trace, axis: int) -> tuple[int | None, str | None]:
    view, shape = trace.view, trace.weight_shape
    if view is None:
        return None, trace.reason
    size, stride = view.shape[axis], view.stride(axis)
    where = f"axis {axis} of the operand ({size} elements)"
    if stride == 0:
        return None, f"{where} is a broadcast, not an axis of the weight"
    if stride >= _extent(shape):
        kind = trace.index_axes.get(stride)
        what = "ids that depend on the input" if kind else "a constant index" if kind is False else "a merged index"
        return None, f"{where} is gathered by {what}, not an axis of the weight"
    strides = torch.empty(shape, device="meta").stride()
    matches = [d for d in range(len(shape)) if strides[d] == stride and shape[d] > 1]
    if not matches:
        return None, f"{where} steps through the weight {stride} elements at a time, along no single axis"
    d = matches[0]
    if size != shape[d]:
        return None, (
            f"{where} runs over {size} of the {shape[d]} elements of weight axis {d}; mpqc quantizes a "
            "weight along whole axes, which then would not match the blocks the matmul reduces over"
        )
    if not _lines_start_at_zero(view, axis, strides[d], shape[d], _extent(shape)):
        return None, f"{where} wraps around weight axis {d} instead of running along it from its start"
    return d, None


def _lines_start_at_zero(view: torch.Tensor, axis: int, step: int, size: int, extent: int) -> bool:
    """Whether every line of the operand along ``axis`` starts at coordinate 0 of the weight axis.

    Broadcast and index axes are left out: a gather picks whole slices of the table, so it
    moves no line along another axis."""
    offset = torch.tensor(view.storage_offset(), dtype=torch.int64)
    for d in range(view.dim()):
        if d == axis or view.stride(d) in (0,) or view.stride(d) >= extent or view.shape[d] == 1:
            continue
        offset = offset.unsqueeze(-1) + torch.arange(view.shape[d]) * view.stride(d)
    return bool(((offset // step) % size == 0).all())
