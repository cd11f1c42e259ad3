"""The compiled graph prepared for torch.onnx: every quantizer becomes one marked op call.

``mpqc.compile`` puts ``WeightQuantizer`` / ``ActivationQuantizer`` modules into the graph.
For export each quantizer *site* (a matmul's weight; one slot of an activation quantizer,
that is one activation operand of one matmul) becomes a call ``mpqc_export::site(x, key)``,
which the ONNX translation turns into a placeholder node ``mpqc_export.Site`` carrying the
key. The translated graph is therefore the same for every plan of a compiled model and is
translated once (the slow part of an export); ``resolve`` then reads the formats the plan
gave each quantizer and groups the sites into what gets written:

- ``WeightRecord``: one parameter stored in one format (matmuls sharing a weight and a
  format share it), replaced by low-bit initializers and their decoding (``weights``);
- ``ActivationRecord``: one quantize call (the matmuls an activation quantizer serves in
  one format share it, as they share one quantize call in the compiled model), written as
  a call of an ``mpqc`` function (``functions``).

Sites whose format leaves the tensor as it is (no format, or a cast to its own dtype) are
bypassed. The placeholder also keeps ONNX constant folding from turning a weight into a
transposed float copy before it is replaced.
"""

from __future__ import annotations

import copy
import dataclasses
import operator

import torch

from mpqc.formats import Format, get_format
from mpqc.graph import QUANTIZER_META

__all__ = [
    "ActivationRecord",
    "Resolved",
    "Site",
    "Template",
    "UnsupportedExport",
    "WeightRecord",
    "prepare",
    "resolve",
]


class UnsupportedExport(ValueError):
    """A format, node or setting that this exporter cannot write; the message names which."""


@torch.library.custom_op("mpqc_export::site", mutates_args=())
def site_op(x: torch.Tensor, key: int) -> torch.Tensor:
    """Marks a quantizer site for the ONNX translation; an identity when run."""
    return x.clone()


@site_op.register_fake
def _(x, key):
    return torch.empty_like(x)


# ---- the template: the graph with every quantizer site marked -------------------------------------


@dataclasses.dataclass(frozen=True)
class Site:
    key: int
    kind: str  # "weight" or "activation"
    quantizer: str  # the quantizer submodule's name in the compiled module
    matmul: str
    slot: int | None  # activation quantizers: which output slot
    source: str  # weight FQN, or the fx name of the activation node
    axis: int  # non-negative reduction axis of the quantized tensor
    dtype: torch.dtype


@dataclasses.dataclass
class Template:
    module: torch.fx.GraphModule
    sites: dict[int, Site]


def prepare(qmodel) -> Template:
    """A copy of ``qmodel.module`` with every quantizer site replaced by a marker call."""
    src = qmodel.module
    gm = torch.fx.GraphModule(src, copy.deepcopy(src.graph))
    g = gm.graph
    sites: dict[int, Site] = {}
    for node in list(g.nodes):
        info = node.meta.get(QUANTIZER_META)
        if not info or node.op != "call_module":
            continue
        quantizer = src.get_submodule(node.target)
        (source,) = node.args
        val = source.meta.get("val")
        rank = val.dim() if val is not None else None
        dtype = val.dtype if val is not None else torch.float32
        axis = quantizer.axis % rank if rank else quantizer.axis
        if info["kind"] == "weight":
            site = Site(len(sites), "weight", node.target, info["matmul"], None, info["weight"], axis, dtype)
            sites[site.key] = site
            with g.inserting_after(node):
                marker = g.call_function(torch.ops.mpqc_export.site.default, (source, site.key))
            marker.meta["val"] = val
            node.replace_all_uses_with(marker)
            g.erase_node(node)
        elif info["kind"] == "activation":
            for user in list(node.users):
                if user.op != "call_function" or user.target is not operator.getitem:
                    raise UnsupportedExport(
                        f"activation quantizer {node.name}: expected getitem users, found {user.format_node()}"
                    )
                slot = user.args[1]
                site = Site(
                    len(sites), "activation", node.target, quantizer.consumers[slot], slot, source.name, axis, dtype
                )
                sites[site.key] = site
                with g.inserting_before(user):
                    marker = g.call_function(torch.ops.mpqc_export.site.default, (source, site.key))
                marker.meta["val"] = val
                user.replace_all_uses_with(marker)
                g.erase_node(user)
            g.erase_node(node)
    gm.delete_all_unused_submodules()
    g.lint()
    gm.recompile()
    return Template(gm, sites)


# ---- resolving a plan's formats at the sites ---------------------------------------------------------


@dataclasses.dataclass
class WeightRecord:
    """One stored weight: a parameter in one format, read by one or more matmuls."""

    key: int
    weight: str  # parameter FQN
    format: Format  # block size in force
    axis: int  # the parameter's own reduction axis (non-negative)
    rounding: str
    sites: list[int]
    matmuls: list[str]
    components: list[str]


@dataclasses.dataclass
class ActivationRecord:
    """One activation quantize call: a tensor in one format, read by one or more matmuls."""

    key: int
    source: str  # fx node name of the quantized tensor
    format: Format
    axis: int  # non-negative
    rounding: str
    sites: list[int]
    matmuls: list[str]
    components: list[str]


@dataclasses.dataclass
class Resolved:
    """What a plan makes of the template's sites."""

    weights: list[WeightRecord]
    activations: list[ActivationRecord]
    bypassed: list[int]  # sites left as they are


def _is_identity(fmt: Format | None, dtype: torch.dtype) -> bool:
    return fmt is None or (fmt.family == "cast" and getattr(torch, fmt.cast_dtype) == dtype)


def _check_preset(fmt: Format, where: str) -> None:
    if fmt.family == "ggml":
        raise UnsupportedExport(
            f"{where}: {fmt.name} is a llama.cpp block format, which has no ONNX form here; "
            "write it to GGUF instead (mpqc.export.to_gguf, or `mpqc export --gguf OUT.gguf`)"
        )
    try:
        preset = get_format(fmt.name)
    except ValueError:
        preset = None
    same = preset is not None and (preset == fmt if fmt.family == "cast" else preset.with_block(fmt.block_size) == fmt)
    if not same:
        raise UnsupportedExport(
            f"{where}: format {fmt!r} is neither a preset nor a preset with another block size; "
            "only those have an ONNX form here"
        )


def resolve(qmodel, template: Template) -> Resolved:
    """Group the template's sites by the formats ``qmodel``'s current plan gives them."""
    comp = {m.name: c.name for c in qmodel.plan.components for m in c.matmuls}
    weights: dict[tuple, WeightRecord] = {}
    activations: dict[tuple, ActivationRecord] = {}
    bypassed = []
    for site in template.sites.values():
        quantizer = qmodel.module.get_submodule(site.quantizer)
        if site.kind == "weight":
            fmt = quantizer.format
            where = f"weight {site.source} of matmul {site.matmul!r}"
        else:
            fmt = quantizer.formats[site.slot]
            where = f"activation {site.source} (axis {site.axis}) of matmul {site.matmul!r}"
        if _is_identity(fmt, site.dtype):
            bypassed.append(site.key)
            continue
        _check_preset(fmt, where)
        if site.dtype != torch.float32:
            raise UnsupportedExport(
                f"{where}: the exporter writes float32 models; this tensor is {site.dtype} "
                "(compile the model in float32: model.float() before mpqc.capture)"
            )
        rounding = quantizer.rounding
        if site.kind == "weight":
            key = (site.source, fmt, site.axis, rounding)
            record = weights.get(key)
            if record is None:
                record = weights[key] = WeightRecord(len(weights), site.source, fmt, site.axis, rounding, [], [], [])
        else:
            key = (site.quantizer, fmt)
            record = activations.get(key)
            if record is None:
                record = activations[key] = ActivationRecord(
                    len(activations), site.source, fmt, site.axis, rounding, [], [], []
                )
        record.sites.append(site.key)
        record.matmuls.append(site.matmul)
        if comp[site.matmul] not in record.components:
            record.components.append(comp[site.matmul])
    return Resolved(list(weights.values()), list(activations.values()), bypassed)
