"""mpqc.export.to_onnx: a compiled mixed-precision model -> an ONNX file with low-bit weights.

    result = mpqc.export.to_onnx(qmodel, "model.onnx")                 # ONNX Runtime runs it
    result = mpqc.export.to_onnx(qmodel, "model.onnx", fp_weights="standard")  # FLOAT4E2M1 & co, opset 25

Steps: ``markers.prepare`` turns every quantizer site into a marked op call, and
``torch.onnx.export`` (dynamo) translates that graph once per compiled model, with the batch
and sequence dims dynamic and the sites as placeholder nodes (other opsets are converted
from that translation). Per export, ``markers.resolve`` reads the plan's formats at the
sites; bypassed sites vanish, weight sites become low-bit initializers and their decoding
(``weights``), activation sites calls of the ``mpqc`` functions (``functions``); the
function definitions and the precision metadata (``metadata``) are added, and the file is
checked (``onnx.checker``, full) and written atomically: into a temporary directory next
to the target, then renamed into place (the external data file first, then the model).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import time
import warnings
import weakref

import onnx
import onnx_ir as ir
import onnxscript.optimizer
import onnxscript.version_converter
import torch
from tqdm.auto import tqdm

from mpqc.io import atomic_files

from . import functions, metadata
from .markers import Resolved, Template, UnsupportedExport, prepare, resolve
from .weights import FP_WEIGHT_FORMS, STANDARD, TABLE, WeightEncoder

__all__ = ["ExportResult", "UnsupportedExport", "to_onnx"]

MIN_OPSET = 21  # blocked DequantizeLinear
STANDARD_OPSET = 25  # FLOAT4E2M1 / FLOAT8E8M0 in DequantizeLinear
MAX_OPSET = onnx.defs.onnx_opset_version()
EXTERNAL_DATA_THRESHOLD = 1 << 30  # above 1 GiB of initializers, data goes to a side file by default
PLACEHOLDER_DOMAIN = "mpqc_export"
PLACEHOLDER_OP = "Site"
KEY_ATTR = "mpqc_key"


@dataclasses.dataclass
class ExportResult:
    """What ``to_onnx`` wrote, and what it took."""

    path: str
    data_path: str | None  # external data file, or None when the weights are inside the model file
    file_bytes: int  # the model file plus its external data
    weight_bytes: int  # bytes of the stored matmul weights (codes, scales) written in low-bit form
    opset: int
    fp_weights: str
    weights: int  # stored quantized weights
    activations: int  # activation quantize calls
    seconds: dict  # per stage: torch_export (0 when reused), encode, save, check

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- translation: once per compiled model and opset ---------------------------------------------------


@functools.cache
def _placeholder_op():
    from onnxscript.values import Op, Opset

    S = onnx.defs.OpSchema
    schema = S(
        PLACEHOLDER_OP,
        PLACEHOLDER_DOMAIN,
        1,
        inputs=[S.FormalParameter("X", "T")],
        outputs=[S.FormalParameter("Y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
        attributes=[S.Attribute(KEY_ATTR, S.AttrType.INT, "")],
    )
    return Op(Opset(PLACEHOLDER_DOMAIN, 1), PLACEHOLDER_OP, schema)


def _translate_site(x, key: int):
    return _placeholder_op()(x, **{KEY_ATTR: key})


# Translated graphs with every quantizer site marked, per compiled model and opset. A model's
# plan (set_plan) changes formats, never the graph, so one translation serves every plan.
_TRANSLATIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _template(qmodel) -> Template:
    """The compiled graph with its quantizer sites marked (cheap; cached with the translations)."""
    per_model = _TRANSLATIONS.setdefault(qmodel, {})
    if "template" not in per_model:
        per_model["template"] = prepare(qmodel)
    return per_model["template"]


def _translation(qmodel, opset: int) -> tuple[ir.Model, float]:
    """(translated model, seconds spent now): cached per compiled model and opset."""
    per_model = _TRANSLATIONS.setdefault(qmodel, {})
    if opset in per_model:
        return per_model[opset], 0.0
    t0 = time.perf_counter()
    if MIN_OPSET not in per_model:
        model = _torch_export(_template(qmodel), MIN_OPSET)
        for node in _all_nodes(model.graph):
            # The exporter's node metadata repeats source locations and module paths at length;
            # the mpqc.* keys say what matters here, and dropping these keeps small models small.
            for k in [k for k in node.metadata_props if not k.startswith(metadata.PREFIX)]:
                del node.metadata_props[k]
        per_model[MIN_OPSET] = model
    if opset != MIN_OPSET:
        # Another opset is a conversion of the same translation (torch.onnx itself translates
        # at one opset and converts), not a second trace.
        model = per_model[MIN_OPSET].clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnxscript.version_converter.convert_version(model, opset, fallback=True)
        per_model[opset] = model
    return per_model[opset], time.perf_counter() - t0


def _torch_export(template: Template, opset: int) -> ir.Model:
    gm = template.module.eval()
    example = torch.zeros((2, 8), dtype=torch.long)
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)  # "torchvision is not installed" notices
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and pytree notices
            program = torch.onnx.export(
                gm,
                (example,),
                dynamo=True,
                dynamic_shapes=({0: "batch", 1: "sequence"},),
                input_names=["input_ids"],
                output_names=["logits"],
                opset_version=opset,
                custom_translation_table={torch.ops.mpqc_export.site.default: _translate_site},
                verbose=False,
                report=False,
                optimize=False,
            )
            # One pass of onnxscript's optimizer (constant folding, dead code) without ONNX
            # shape inference: on SmolLM2-135M half the time of torch.onnx's default
            # optimization (20 s against 41 s) for 5% more nodes, which ONNX Runtime folds anyway.
            onnxscript.optimizer.optimize_ir(program.model, num_iterations=1, onnx_shape_inference=False)
    except Exception as e:  # the exporter's message is long; keep it as the cause
        raise UnsupportedExport(_explain_export_failure(e)) from e
    finally:
        registration_log.setLevel(level)
    return program.model


def _explain_export_failure(exc: BaseException) -> str:
    """The failing node and op out of torch.onnx's long report, and what to try."""
    text = "\n".join(str(e) for e in _chain(exc))
    node = re.search(r"Error when translating node %(\S+) : .*?target=([\w.]+)", text)
    missing = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)
    lines = ["torch.onnx.export could not translate the compiled graph"]
    if node:
        lines[0] += f": node {node.group(1)!r} ({node.group(2)})"
    if missing:
        lines.append(f"  torch.onnx has no ONNX translation for the op {missing.group(1)}")
        if "grouped_mm" in missing.group(1):
            lines.append(
                "  mixture-of-experts: load the model with experts_implementation='batched_mm', which exports, "
                "and capture again"
            )
    if not node and not missing:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        lines.append(f"  {type(exc).__name__}: {first}")
    lines.append("  (the full report of torch.onnx is this error's __cause__)")
    return "\n".join(lines)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


# ---- the export ------------------------------------------------------------------------------------


def _check_args(qmodel, fp_weights, opset):
    from mpqc.compile import QuantizedModel

    if not isinstance(qmodel, QuantizedModel):
        raise TypeError(f"to_onnx takes a compiled model from mpqc.compile, got {type(qmodel).__name__}")
    if fp_weights not in FP_WEIGHT_FORMS:
        raise ValueError(f"fp_weights must be one of {', '.join(FP_WEIGHT_FORMS)}, got {fp_weights!r}")
    if opset is None:
        opset = STANDARD_OPSET if fp_weights == STANDARD else MIN_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an int, got {type(opset).__name__}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(
            f"opset {opset} is out of range: blocked DequantizeLinear needs at least {MIN_OPSET}, and the "
            f"installed onnx knows up to {MAX_OPSET}"
        )
    if fp_weights == STANDARD and opset < STANDARD_OPSET:
        raise ValueError(
            f"fp_weights='standard' stores FLOAT8E8M0 scales, which DequantizeLinear takes from opset "
            f"{STANDARD_OPSET}; got opset={opset}"
        )
    return opset


def _parameter(module: torch.nn.Module, name: str) -> torch.Tensor:
    try:
        return module.get_parameter(name)
    except AttributeError:
        return module.get_buffer(name)


def to_onnx(
    qmodel,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    fp_weights: str = TABLE,
    external_data: bool | None = None,
    check: bool = True,
    progress: bool = True,
) -> ExportResult:
    """Export a compiled model (``mpqc.compile``) with its current plan to ONNX at ``path``.

    Weights are stored in low-bit form, activation quantization is a call of an ``mpqc``
    function, and the model and every quantizing node carry precision metadata
    (docs/onnx.md). The input is ``input_ids`` (int64 [batch, sequence], both dynamic), the
    output ``logits``.

    ``opset``: of the default domain; default 21 (25 with ``fp_weights="standard"``).
    ``fp_weights``: how weights with float elements (MXFP4/6/8, NVFP4, FP4-E2M1) are stored:
    "table" (uint8 codes decoded through a lookup table; ONNX Runtime runs it) or "standard"
    (FLOAT4E2M1/FLOAT8 data, FLOAT8E8M0 scales, DequantizeLinear; onnx.reference runs it,
    ONNX Runtime has no kernel yet). Integer-element weights always use INT4/INT8
    DequantizeLinear (int3 in INT4, int5-int7 in INT8). ``external_data``: initializers in
    ``<path>.data`` (True), inside the model file (False), or by size (None: external above
    1 GiB). ``check``: run
    ``onnx.checker.check_model(full_check=True)`` before the file is moved into place.

    The translation by torch.onnx (most of the time of a small export) is done once per
    compiled model and opset: ``qmodel.set_plan(other); to_onnx(qmodel, ...)`` reuses it.
    Raises UnsupportedExport, naming the node and format, for what has no ONNX form here.
    """
    opset = _check_args(qmodel, fp_weights, opset)
    if qmodel.plan is None:
        raise ValueError("the compiled model has no plan; call qmodel.set_plan(plan) first")
    path = os.fspath(path)
    seconds = {}
    template = _template(qmodel)
    resolved = resolve(qmodel, template)
    encoder = WeightEncoder(fp_weights=fp_weights, opset=opset)
    for record in resolved.weights:
        encoder.check_supported(record)  # fail before the slow part
    translated, seconds["torch_export"] = _translation(qmodel, opset)

    t0 = time.perf_counter()
    model = translated.clone()
    weight_bytes = _rewrite(model, template, resolved, encoder, qmodel, progress)
    _finish(model, qmodel, fp_weights, opset)
    seconds["encode"] = time.perf_counter() - t0

    if external_data is None:
        external_data = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_path, size = _save_atomic(model, path, bool(external_data), check, seconds)
    return ExportResult(
        path=path,
        data_path=data_path,
        file_bytes=size,
        weight_bytes=weight_bytes,
        opset=opset,
        fp_weights=fp_weights,
        weights=len(resolved.weights),
        activations=len(resolved.activations),
        seconds=seconds,
    )


def _all_nodes(graph: ir.Graph):
    return list(ir.traversal.RecursiveGraphIterator(graph))


def _rewrite(
    model: ir.Model, template: Template, resolved: Resolved, encoder: WeightEncoder, qmodel, progress: bool
) -> int:
    """Sites -> bypasses, mpqc function calls and low-bit weights. Returns the stored weight bytes."""
    graph = model.graph
    order = {}
    sites: dict[int, ir.Node] = {}
    for i, node in enumerate(_all_nodes(graph)):
        order[node] = i
        if node.domain == PLACEHOLDER_DOMAIN:
            sites[node.attributes[KEY_ATTR].as_int()] = node
    quantized = [k for r in (*resolved.weights, *resolved.activations) for k in r.sites]
    lost = [template.sites[k] for k in quantized if k not in sites]
    if lost:
        raise RuntimeError(f"the ONNX translation lost quantizer sites {[(s.kind, s.matmul) for s in lost]}")

    def replace(record_sites, output: ir.Value) -> list[ir.Value]:
        inputs = []
        for key in record_sites:
            node = sites.pop(key)
            inputs.append(node.inputs[0])
            node.outputs[0].replace_all_uses_with(output)
            node.graph.remove(node, safe=True)
        return inputs

    for key in resolved.bypassed:
        node = sites.pop(key, None)
        if node is not None:
            node.outputs[0].replace_all_uses_with(node.inputs[0])
            node.graph.remove(node, safe=True)

    for record in resolved.activations:
        first = min((sites[k] for k in record.sites), key=order.__getitem__)
        op_type, attrs = functions.call_attributes(record.format, record.axis, record.rounding)
        call = ir.Node(
            functions.DOMAIN,
            op_type,
            [first.inputs[0]],
            ir.convenience.convert_attributes(attrs),
            name=f"mpqc/{record.source}/{record.format.name}",
            metadata_props=metadata.activation_node_metadata(record),
        )
        first.graph.insert_before(first, call)
        call.outputs[0].name = f"{record.source}.{record.format.name}"
        replace(record.sites, call.outputs[0])

    weight_bytes = 0
    replaced_inputs = []
    for record in tqdm(resolved.weights, desc="encode weights", unit="weight", disable=not progress):
        first = min((sites[k] for k in record.sites), key=order.__getitem__)
        weight = _parameter(qmodel.module, record.weight)
        # What the compiled model multiplies by (its quantizer returns the cached quantized
        # weight): what the file must decode to.
        with torch.no_grad():
            expected = qmodel.module.get_submodule(template.sites[record.sites[0]].quantizer)(weight)
        encoded = encoder.encode(record, weight, expected=expected)
        for n in encoded.nodes:
            n.metadata_props.update(
                metadata.weight_node_metadata(record, encoded)
                if n is encoded.output.producer()
                else metadata.decode_node_metadata(record)
            )
        first.graph.insert_before(first, encoded.nodes)
        for init in encoded.initializers:
            graph.register_initializer(init)
        replaced_inputs += replace(record.sites, encoded.output)
        weight_bytes += encoded.nbytes
    for init in encoder.shared.values():
        graph.register_initializer(init)
    # The float parameters the sites read are gone unless something else (an embedding tied to a
    # quantized head) still reads them.
    for value in replaced_inputs:
        if value.name in graph.initializers and not value.uses():
            del graph.initializers[value.name]
    return weight_bytes


def _finish(model: ir.Model, qmodel, fp_weights: str, opset: int) -> None:
    used = {n.op_type for n in _all_nodes(model.graph) if n.domain == functions.DOMAIN}
    model.opset_imports.pop(PLACEHOLDER_DOMAIN, None)
    model.graph.opset_imports.pop(PLACEHOLDER_DOMAIN, None)
    if used:
        model.graph.opset_imports[functions.DOMAIN] = functions.DOMAIN_VERSION
    for op_type in sorted(used):
        fn = ir.serde.deserialize_function(functions.function_proto(op_type, opset))
        model.functions[fn.identifier()] = fn
    import mpqc

    model.producer_name = "mpqc"
    model.producer_version = mpqc.__version__
    model.metadata_props.update(metadata.model_metadata(qmodel, fp_weights=fp_weights, opset=opset))


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _save_atomic(model: ir.Model, path: str, external: bool, check: bool, seconds: dict) -> tuple[str | None, int]:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    name = os.path.basename(path)
    data_name = f"{name}.data"
    with atomic_files(directory, [data_name, name]) as tmpdir:  # the model, which names its data, last
        t0 = time.perf_counter()
        tmp_model = os.path.join(tmpdir, name)
        ir.save(model, tmp_model, external_data=data_name if external else None)
        seconds["save"] = time.perf_counter() - t0
        if check:
            t0 = time.perf_counter()
            try:
                onnx.checker.check_model(tmp_model, full_check=True)
            except Exception as e:
                raise RuntimeError(f"the exported model fails onnx.checker (nothing written to {path}): {e}") from e
            seconds["check"] = time.perf_counter() - t0
        tmp_data = os.path.join(tmpdir, data_name)
        size = os.path.getsize(tmp_model)
        data_path = None
        if os.path.exists(tmp_data):
            size += os.path.getsize(tmp_data)
            data_path = os.path.join(directory, data_name)
    return data_path, size
