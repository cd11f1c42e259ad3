"""ONNX export of mixed-precision models: low-bit weights, activation quantization as ``mpqc``
functions, and precision metadata (schema in docs/onnx.md).

    result = mpqc.export.to_onnx(qmodel, "model.onnx")
    mpqc.export.read_metadata("model.onnx")["components"]
    logits = mpqc.export.OnnxRuntimeLM("model.onnx")(input_ids)
"""

from .gguf import GGUFExportResult, gguf_tensor_types, llama_quantize_args, to_gguf
from .llamacpp import LlamaCppError, LlamaCppLM
from .markers import UnsupportedExport
from .metadata import SCHEMA_VERSION, read_metadata
from .onnx import ExportResult, to_onnx
from .runtime import OnnxRuntimeLM

__all__ = [
    "SCHEMA_VERSION",
    "ExportResult",
    "GGUFExportResult",
    "LlamaCppError",
    "LlamaCppLM",
    "OnnxRuntimeLM",
    "UnsupportedExport",
    "gguf_tensor_types",
    "llama_quantize_args",
    "read_metadata",
    "to_gguf",
    "to_onnx",
]
