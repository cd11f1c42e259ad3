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

    def __init__(self, path: str | os.PathLike, *, providers=None, threads: int | None = None,
                 optimization: str = "all"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if optimization not in levels:
            raise ValueError(f"optimization must be one of {', '.join(levels)}, got {optimization!r}")
        options.graph_optimization_level = levels[optimization]
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
