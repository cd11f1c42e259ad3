"""The precision metadata an exported model carries, and reading it back.

Model ``metadata_props`` (every value a string; JSON where structured), schema version 1:

    mpqc.schema_version        "1"
    mpqc.version               the mpqc version that wrote the file
    mpqc.model_class           e.g. "LlamaForCausalLM"
    mpqc.plan                  the plan, as Plan.to_json() writes it
    mpqc.granularity           "matmul", "layer" or "custom:<name>"
    mpqc.quantization_ratio    Q_r by parameters (the paper's definition)
    mpqc.quantization_ratio_macs
    mpqc.q_r_definition        which parameters Q_r counts: "params of all matmuls", or all but
                               the plan's kept-high components (optional: files written before
                               it existed count all matmuls)
    mpqc.average_bits          bits per matmul weight, scale overhead included
    mpqc.components            JSON: every component -> its precision and matmuls
    mpqc.weight_storage        JSON: how float-element weights are stored ("table" or "standard"), opset

Node ``metadata_props`` on every node that quantizes something: each activation function
call, and the node that outputs each decoded weight (its DequantizeLinear, or the last node
of its table decoding):

    mpqc.kind                  "activation" or "weight"
    mpqc.format                the format name, e.g. "mxint4"
    mpqc.block_size            "32", "vector", "tensor", or "" for casts
    mpqc.axis                  the axis the blocks run along (the matmul's reduction axis)
    mpqc.rounding              "nearest" or "even"
    mpqc.components            JSON list of the components whose matmuls read this value
    mpqc.matmuls               JSON list of those matmuls
    mpqc.weight                (weights) the parameter's name in the PyTorch model
    mpqc.storage               (weights) int_dequantize_linear, lookup_table, standard_dequantize_linear, cast
    mpqc.storage_detail        (weights) JSON: element and scale types as stored

The other nodes of a weight's decoding carry ``mpqc.kind`` = "weight_decode" and ``mpqc.weight``.
"""

from __future__ import annotations

import json
import os

import onnx

from mpqc.plan import Q_R_ALL

SCHEMA_VERSION = 1
PREFIX = "mpqc."
MODEL_KEYS = (
    "mpqc.schema_version",
    "mpqc.version",
    "mpqc.model_class",
    "mpqc.plan",
    "mpqc.granularity",
    "mpqc.quantization_ratio",
    "mpqc.quantization_ratio_macs",
    "mpqc.average_bits",
    "mpqc.components",
    "mpqc.weight_storage",
)
OPTIONAL_MODEL_KEYS = {"mpqc.q_r_definition": Q_R_ALL}  # key -> its value in files written before it
NODE_KEYS = (
    "mpqc.kind",
    "mpqc.format",
    "mpqc.block_size",
    "mpqc.axis",
    "mpqc.rounding",
    "mpqc.components",
    "mpqc.matmuls",
)


def _block(fmt) -> str | int | None:
    if fmt is None or fmt.family == "cast":
        return None
    return fmt.block_size


def _fmt(fmt) -> dict | None:
    if fmt is None:
        return None
    return {"format": fmt.name, "block_size": _block(fmt)}


def component_table(plan) -> dict:
    """Every component of the plan's granularity -> its weight and activation precision and matmuls."""
    out = {}
    for c in plan.components:
        first = c.matmuls[0]
        out[c.name] = {
            "weight": _fmt(plan.weight_format(first)),
            "activation": _fmt(plan.activation_format(first)),
            "low_precision": plan.precision(c.name).is_low,
            "layer": c.layer,
            "params": c.params,
            "matmuls": [m.name for m in c.matmuls],
        }
    return out


def model_metadata(qmodel, *, fp_weights: str, opset: int) -> dict[str, str]:
    import mpqc

    plan = qmodel.plan
    summary = plan.summary()
    return {
        "mpqc.schema_version": str(SCHEMA_VERSION),
        "mpqc.version": mpqc.__version__,
        "mpqc.model_class": qmodel.graph.model_class,
        "mpqc.plan": plan.to_json(indent=None),
        "mpqc.granularity": plan.granularity_label,
        "mpqc.quantization_ratio": repr(summary["quantization_ratio_params"]),
        "mpqc.quantization_ratio_macs": repr(summary["quantization_ratio_macs"]),
        "mpqc.q_r_definition": summary["q_r_definition"],
        "mpqc.average_bits": repr(summary["average_bits"]),
        "mpqc.components": json.dumps(component_table(plan)),
        "mpqc.weight_storage": json.dumps({"fp_weights": fp_weights, "opset": opset}),
    }


def _common(kind: str, fmt, axis: int, rounding: str, matmuls, components) -> dict[str, str]:
    block = _block(fmt)
    return {
        "mpqc.kind": kind,
        "mpqc.format": fmt.name,
        "mpqc.block_size": "" if block is None else str(block),
        "mpqc.axis": str(axis),
        "mpqc.rounding": rounding,
        "mpqc.components": json.dumps(list(components)),
        "mpqc.matmuls": json.dumps(list(matmuls)),
    }


def activation_node_metadata(record) -> dict[str, str]:
    return _common("activation", record.format, record.axis, record.rounding, record.matmuls, record.components)


def decode_node_metadata(record) -> dict[str, str]:
    return {"mpqc.kind": "weight_decode", "mpqc.weight": record.weight}


def weight_node_metadata(record, encoded) -> dict[str, str]:
    meta = _common("weight", record.format, record.axis, record.rounding, record.matmuls, record.components)
    meta.update(
        {
            "mpqc.weight": record.weight,
            "mpqc.storage": encoded.storage,
            "mpqc.storage_detail": json.dumps(encoded.details),
        }
    )
    return meta


# ---- reading -------------------------------------------------------------------------------------


def _load(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        return onnx.load(os.fspath(model), load_external_data=False)
    raise TypeError(f"read_metadata takes an onnx.ModelProto or a path, got {type(model).__name__}")


def read_metadata(model) -> dict:
    """The mpqc metadata of an exported model (a path or an onnx.ModelProto), parsed.

    Returns {"schema_version", "version", "model_class", "plan" (dict), "granularity",
    "quantization_ratio", "quantization_ratio_macs", "q_r_definition", "average_bits", "components" (dict),
    "weight_storage" (dict), "nodes": [{"name", "op_type", "domain", <mpqc.* keys without the
    prefix, JSON parsed>}]}. Raises ValueError for a file without mpqc metadata or of a newer
    schema than this reader knows."""
    proto = _load(model)
    props = {p.key: p.value for p in proto.metadata_props}
    if "mpqc.schema_version" not in props:
        raise ValueError("the model carries no mpqc metadata (no 'mpqc.schema_version' in metadata_props)")
    version = int(props["mpqc.schema_version"])
    if version > SCHEMA_VERSION:
        raise ValueError(f"mpqc metadata schema {version} is newer than this reader ({SCHEMA_VERSION}); upgrade mpqc")
    out: dict = {}
    for key in MODEL_KEYS:
        if key not in props:
            raise ValueError(f"mpqc metadata lacks {key!r}")
        name = key[len(PREFIX) :]
        value = props[key]
        if name in ("plan", "components", "weight_storage"):
            value = json.loads(value)
        elif name in ("quantization_ratio", "quantization_ratio_macs", "average_bits"):
            value = float(value)
        elif name == "schema_version":
            value = int(value)
        out[name] = value
    for key, before in OPTIONAL_MODEL_KEYS.items():
        out[key[len(PREFIX) :]] = props.get(key, before)
    nodes = []
    for node in proto.graph.node:
        meta = {p.key: p.value for p in node.metadata_props if p.key.startswith(PREFIX)}
        if not meta or meta.get("mpqc.kind") == "weight_decode":
            continue
        entry = {"name": node.name, "op_type": node.op_type, "domain": node.domain}
        for key, value in meta.items():
            name = key[len(PREFIX) :]
            entry[name] = json.loads(value) if name in ("components", "matmuls", "storage_detail") else value
        nodes.append(entry)
    out["nodes"] = nodes
    return out
