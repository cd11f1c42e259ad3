"""capture: export a Hugging Face causal LM to an annotated ``mpqc.graph.Graph``.

    graph = mpqc.capture(model, (input_ids,))
    graph.module(other_input_ids)          # logits, any batch size and sequence length

Steps: ``torch.export.export(model, (input_ids,), kwargs={"use_cache": False},
strict=False)`` with the batch and sequence dims dynamic (and ``config.use_cache`` off
meanwhile); a check that export kept them dynamic, both in the input's shape and in the
program's shape guards (a loop over positions or a one-chunk scan fixes or bounds the
length: such a graph is refused, naming the dimension, rather than failing or computing
wrong logits later); a runnable GraphModule that maps input_ids to the logits tensor;
DecomposeAttention (fused SDPA -> two matmuls); the analysis passes, the last of which
refuses any parameter that reaches a matmul other than as its weight. The example input
fixes the reference batch size and sequence length that attention MACs are counted at.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import traceback

import torch
import torch.utils._pytree as pytree

from mpqc.graph import Graph
from mpqc.passes.analysis import run_analysis
from mpqc.passes.transform.decompose_attention import DecomposeAttention

__all__ = ["CaptureError", "capture"]


class CaptureError(RuntimeError):
    """torch.export could not capture the model; the message names where and what to try."""


def capture(model: torch.nn.Module, example_inputs, *, dynamic: bool = True) -> Graph:
    """Export ``model`` and annotate its matmuls.

    ``example_inputs`` is ``(input_ids,)`` (or the tensor itself): int64 [batch, seq]
    token ids. With ``dynamic=True`` the captured module runs on any batch size and
    sequence length; with ``dynamic=False`` only on the example's shape. The model is
    put in eval mode and otherwise left untouched; the graph shares its parameters and
    runs on their device and dtype only (``graph.device``, ``graph.dtype``).
    """
    input_ids = _example_input_ids(example_inputs)
    model.eval()
    # The graph is captured on the model's device (it keeps that device); the example ids follow.
    first = next(model.parameters(), None)
    if first is not None:
        input_ids = input_ids.to(first.device)
    batch, seq = input_ids.shape
    input_name, kwargs = _forward_signature(model)
    # Sizes 0 and 1 make torch.export specialize a dim; trace with at least 2 of each.
    trace_ids = _at_least_two(input_ids) if dynamic else input_ids
    dynamic_shapes = None
    if dynamic:
        auto = torch.export.Dim.AUTO
        dynamic_shapes = {input_name: {0: auto, 1: auto}, **{k: None for k in kwargs}}
    try:
        with _no_cache(model):
            ep = torch.export.export(model, (trace_ids,), kwargs=kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    except Exception as e:
        raise CaptureError(explain_export_failure(model, e)) from e
    module = _logits_module(ep, model)
    if dynamic:
        _check_dims_dynamic(module, model)
        _check_guards(ep, model, (batch, seq))
    DecomposeAttention()(module)
    run_analysis(
        module,
        prefix=_base_model_prefix(model),
        reference_batch_size=batch,
        reference_seq_len=seq,
    )
    return Graph(
        ep,
        module,
        reference_seq_len=seq,
        reference_batch_size=batch,
        model_class=type(model).__name__,
        config=getattr(model, "config", None),
    )


def _example_input_ids(example_inputs) -> torch.Tensor:
    if isinstance(example_inputs, torch.Tensor):
        ids = example_inputs
    elif isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 1:
        ids = example_inputs[0]
    else:
        size = f" of length {len(example_inputs)}" if hasattr(example_inputs, "__len__") else ""
        raise TypeError(
            "capture takes example_inputs=(input_ids,), one int64 tensor [batch, seq]; "
            f"got {type(example_inputs).__name__}{size}"
        )
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        what = (
            f"{ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        )
        raise TypeError(f"input_ids must be an int64 tensor [batch, seq], got {what}")
    if ids.numel() == 0:
        raise ValueError(f"input_ids must hold at least one token, got shape {tuple(ids.shape)}")
    return ids


def _forward_signature(model: torch.nn.Module) -> tuple[str, dict]:
    """The name of forward's first parameter, and use_cache=False if forward takes it."""
    params = inspect.signature(model.forward).parameters
    positional = [p.name for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional:
        raise TypeError(f"{type(model).__name__}.forward takes no positional input; expected forward(input_ids, ...)")
    # A KV cache is state export cannot return as a tensor; the graph computes logits only.
    kwargs = {"use_cache": False} if "use_cache" in params else {}
    return positional[0], kwargs


@contextlib.contextmanager
def _no_cache(model: torch.nn.Module):
    """``use_cache = False`` in the model's config (and its text config) while exporting: some
    models build a KV cache from the config even when forward gets use_cache=False, and export
    cannot return one. The settings are restored afterwards."""
    config = getattr(model, "config", None)
    configs = [config, getattr(config, "text_config", None)]
    saved = [(c, c.use_cache) for c in configs if c is not None and isinstance(getattr(c, "use_cache", None), bool)]
    for c, _ in saved:
        c.use_cache = False
    try:
        yield
    finally:
        for c, before in saved:
            c.use_cache = before


def _at_least_two(ids: torch.Tensor) -> torch.Tensor:
    batch, seq = ids.shape
    if seq < 2:
        ids = ids.repeat(1, 2)
    if batch < 2:
        ids = ids.repeat(2, 1)
    return ids


def _logits_leaf(out_spec: pytree.TreeSpec) -> int:
    """Which flat output of the exported program is the logits."""
    tree = pytree.tree_unflatten(list(range(out_spec.num_leaves)), out_spec)
    if isinstance(tree, int):
        return tree
    if hasattr(tree, "logits"):
        return tree.logits
    if isinstance(tree, dict) and "logits" in tree:
        return tree["logits"]
    if isinstance(tree, (tuple, list)) and tree and isinstance(tree[0], int):
        return tree[0]  # (logits, ...) as models with return_dict=False give
    raise CaptureError(f"cannot find the logits among the model's outputs {out_spec}; return logits or a ModelOutput")


def _logits_module(ep: torch.export.ExportedProgram, model: torch.nn.Module) -> torch.fx.GraphModule:
    """A plain GraphModule: forward(input_ids) -> logits tensor, with no input guards or pytree wrapping."""
    # Guards would reject sizes outside the traced range (e.g. batch 1); the graph itself runs on them.
    if "check_guards" in inspect.signature(ep.module).parameters:
        gm = ep.module(check_guards=False)
    else:  # torch before 2.9: no guard function in the graph, only a pre-hook the rebuild below drops
        gm = ep.module()
    graph = gm.graph
    placeholders = graph.find_nodes(op="placeholder")
    for extra in placeholders[1:]:
        # Constant kwargs such as use_cache=False were baked in; their placeholders are unused.
        if extra.users:
            raise CaptureError(
                f"{type(model).__name__}: the exported graph reads input {extra.target!r} besides input_ids"
            )
        graph.erase_node(extra)
    output = graph.output_node()
    leaves = output.args[0]
    output.args = (leaves[_logits_leaf(ep.call_spec.out_spec)],)
    graph.set_codegen(torch.fx.graph.CodeGen())
    module = torch.fx.GraphModule(gm, graph, class_name=f"Captured{type(model).__name__}")
    module.meta.update(gm.meta)
    return module


def _is_symbolic(size) -> bool:
    """A size export kept symbolic: a SymInt whose expression is not a constant."""
    return isinstance(size, torch.SymInt) and not size.node.expr.is_number


def _check_dims_dynamic(module: torch.fx.GraphModule, model: torch.nn.Module) -> None:
    shape = module.graph.find_nodes(op="placeholder")[0].meta["val"].shape
    for dim, size in zip(("batch", "sequence"), shape):
        if not _is_symbolic(size):
            raise CaptureError(
                f"{type(model).__name__}: torch.export specialized the {dim} dimension of input_ids to {size}: "
                f"the model's code fixes it, so the graph would only run at {dim} size {size}. "
                "Capture with dynamic=False to accept that, or remove what fixes the size"
            )


# Sizes at which the exported program's shape guards are evaluated: around powers of two
# (where chunked and blocked code changes its number of pieces), small and large.
GUARD_PROBE_SIZES = (2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129, 255, 256, 257, 1000, 1025, 4097)


def _guard_failure(guards: torch.nn.Module, inputs: list, shape: tuple[int, int]) -> str | None:
    """The guard the exported program fails at input_ids of ``shape``, or None if it passes them all."""
    ids = torch.empty(shape, dtype=torch.int64, device="meta")
    try:
        guards(ids, *inputs[1:])
    except AssertionError as e:
        return str(e).splitlines()[0].removeprefix("Guard failed: ")
    return None


# Config keys that bound the sequence length a model is built for (its position table).
_MAX_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "max_seq_len", "n_ctx")


def _max_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's config declares, or None: guards beyond it are the model's own limit."""
    config = getattr(model, "config", None)
    for c in (config, getattr(config, "text_config", None)):
        for key in _MAX_LENGTH_KEYS:
            value = getattr(c, key, None) if c is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
                return value
    return None


def _check_guards(ep: torch.export.ExportedProgram, model: torch.nn.Module, example: tuple[int, int]) -> None:
    """Refuse a graph whose shape guards (conditions the model's code put on the sizes) exclude other shapes.

    torch.export keeps a dim symbolic yet records guards such as ``input_ids.size()[1] == 8``
    (a Python loop over positions) or ``size()[1] <= 8`` (a chunked scan traced with one
    chunk); the graph then fails, or computes wrong values, at other sizes. The guards are
    evaluated on meta tensors at GUARD_PROBE_SIZES, varying one dim at a time. Sequence
    lengths are probed up to half the longest the config declares: near the end of its
    position table a model has limits of its own (a padding offset, n-gram streams), which
    HF's forward shares."""
    guarded = ep.module() if "check_guards" in inspect.signature(ep.module).parameters else None
    guards = getattr(guarded, "_guards_fn", None)
    if guards is None:  # torch before 2.9 checks guards another way; nothing to evaluate here
        return
    (call,) = guarded.graph.find_nodes(op="call_module", target="_guards_fn")
    inputs = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in call.args]
    longest = _max_length(model)
    failed = []
    for i, dim in enumerate(("batch", "sequence")):
        sizes = GUARD_PROBE_SIZES
        if i == 1 and longest is not None:
            sizes = tuple(s for s in sizes if s <= longest // 2)
        for size in sizes:
            shape = tuple(size if j == i else example[j] for j in range(2))
            guard = _guard_failure(guards, inputs, shape)
            if guard is not None:
                failed.append(f"{dim} size {size} fails `{guard}`")
                break
    if failed:
        raise CaptureError(
            f"{type(model).__name__}: torch.export kept the input's sizes symbolic, but the exported program only "
            f"holds for some of them: {'; '.join(failed)} (example shape {example}). The model's code fixes or "
            "limits that size (a Python loop over positions, a branch on the length, a chunked scan traced with "
            "one chunk), so the graph would fail or compute wrong logits at other sizes. Capture with "
            "dynamic=False to accept a graph for the example's shape only, try a longer example input, "
            "or change what fixes the size"
        )


def _base_model_prefix(model: torch.nn.Module) -> str | None:
    """transformers' base_model_prefix ("model", "transformer", ...) when it names a submodule."""
    prefix = getattr(model, "base_model_prefix", None)
    if isinstance(prefix, str) and prefix and isinstance(getattr(model, prefix, None), torch.nn.Module):
        return prefix
    return None


# ---- explaining a failed export ---------------------------------------------------------

_OP_PATTERN = re.compile(r"\b((?:aten|torch\.ops\.\w+|prims)\.[\w.]+)")
_CALL_PATTERN = re.compile(
    r'The following call raised this error:\s*\n\s*File "([^"]+)", line (\d+), in (\w+)\s*\n\s*(.+)'
)


def _failing_module(model: torch.nn.Module, exc: BaseException) -> tuple[str, str] | None:
    """(path, class) of the innermost module of ``model`` whose forward was running when ``exc`` was raised."""
    names = {id(m): path for path, m in model.named_modules()}
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module) and id(owner) in names:
            found = (names[id(owner)], type(owner).__name__)
    return found


def explain_export_failure(model: torch.nn.Module, exc: BaseException) -> str:
    """A message naming the model, the failing module, source line and op, and what to try."""
    model_name = type(model).__name__
    text = str(exc)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    lines = [f"torch.export could not capture {model_name}: {type(exc).__name__}: {first}"]
    module = _failing_module(model, exc)
    if module:
        path, cls = module
        lines.append(f"  failing module: {path or '(the model itself)'} ({cls})")
    else:
        lines.append("  failing module: none of the model's modules was running (the failure came after tracing)")
    call = _CALL_PATTERN.search(text)
    if call:
        lines.append(f"  at {call.group(1)}:{call.group(2)} in {call.group(3)}: {call.group(4).strip()}")
    op = _OP_PATTERN.search(text)
    if op:
        lines.append(f"  op: {op.group(1)}")
    lines.append("What to try:")
    config = getattr(model, "config", None)
    data_dependent = "data-dependent" in text or "GuardOnDataDependent" in type(exc).__name__
    if data_dependent:
        lines.append(
            "  - the code branches on tensor values (data-dependent control flow), which export cannot trace; "
            "make it depend on shapes only (torch.where, torch.cond)"
        )
    experts = getattr(config, "_experts_implementation", None) if config is not None else None
    if experts is not None:
        lines.append(
            f"  - mixture-of-experts: load with experts_implementation='grouped_mm' or 'batched_mm' (now {experts!r}); "
            "the 'eager' expert loop is data-dependent"
        )
    attn = getattr(config, "_attn_implementation", None) if config is not None else None
    if config is not None:
        other = "eager" if attn != "eager" else "sdpa"
        lines.append(
            f"  - load the model with attn_implementation={other!r} (now {attn!r}); flash/flex kernels do not export"
        )
        lines.append(
            "  - set model.config.use_cache = False if the model builds a KV cache regardless "
            "(capture passes use_cache=False)"
        )
    lines.append("  - torch.export.draft_export(model, (input_ids,), strict=False) lists every export problem at once")
    return "\n".join(lines)
