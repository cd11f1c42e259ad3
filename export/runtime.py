"""Running an exported file in ONNX Runtime with the compiled model's calling convention.

lm = mpqc.export.OnnxRuntimeLM("model.onnx")
logits = lm(input_ids)                       # torch int64 [batch, seq] -> torch float32 logits
mpqc.evaluate.perplexity(lm, tokens, ...)    # any callable returning logits works there
"""

from __future__ import annotations

import os

import numpy as np
import torch

__all__ = ["OnnxRuntimeLM"]


class OnnxRuntimeLM:
    """An ONNX Runtime session over an exported model: ``lm(input_ids) -> logits`` (torch tensors)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        providers=None,
        threads: int | None = None,
        optimization: str = "all",
        matmul_nbits_accuracy: int | None = 1,
    ):
        """``optimization``: ONNX Runtime's graph optimization level (disable, basic, extended, all).
        ``matmul_nbits_accuracy``: the compute type ONNX Runtime uses where it fuses an INT4
        DequantizeLinear into a MatMulNBits kernel (1 fp32, 2 fp16, 3 bf16, 4 int8; None: ONNX
        Runtime's default, 4, which also quantizes the activations to int8 and so departs from
        the exported numerics by about 1e-2). The default, 1, computes what the file says."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        if optimization not in levels:
            raise ValueError(f"optimization must be one of {', '.join(levels)}, got {optimization!r}")
        options.graph_optimization_level = levels[optimization]
        if matmul_nbits_accuracy is not None:
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(int(matmul_nbits_accuracy)))
        if threads is not None:
            options.intra_op_num_threads = threads
        self.path = os.fspath(path)
        self.session = ort.InferenceSession(self.path, options, providers=providers or ["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.detach().to("cpu", torch.int64).numpy()
        (logits,) = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(ids)})
        return torch.from_numpy(logits)

    def __repr__(self) -> str:
        return f"OnnxRuntimeLM({self.path!r})"
