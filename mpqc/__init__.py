"""mpqc: a mixed-precision quantization compiler for language models.

    graph = mpqc.capture(model, (input_ids,))
    plan = mpqc.Plan.uniform(graph, "mxint4", granularity="matmul")
    qmodel = mpqc.compile(graph, plan)
"""

from . import formats
from .capture import CaptureError, capture
from .compile import QuantizedModel, compile  # noqa: A004
from .graph import Component, Graph, Matmul
from .plan import Plan, Precision
from . import data, evaluate, models, search  # noqa: E402
from .models import load_model

__version__ = "0.1.0"
__all__ = [
    "CaptureError", "Component", "Graph", "Matmul", "Plan", "Precision", "QuantizedModel",
    "capture", "compile", "data", "evaluate", "formats", "load_model", "models", "search",
]
