"""mpqc: a mixed-precision quantization compiler for language models.

    graph = mpqc.capture(model, (input_ids,))
    plan = mpqc.Plan.uniform(graph, "mxint4", granularity="matmul")
    qmodel = mpqc.compile(graph, plan)

``import mpqc`` loads the compiler core only. ``mpqc.search`` (Optuna), ``mpqc.export``
(ONNX) and ``mpqc.studies`` load on first attribute access; docs/architecture.md gives the
layers and which may import which.
"""

import importlib

from . import data, evaluate, formats, models
from .capture import CaptureError, capture
from .compile import QuantizedModel, compile  # noqa: A004
from .graph import Component, Graph, Matmul
from .models import load_model
from .plan import Plan, Precision

__version__ = "0.1.0"
__all__ = [
    "CaptureError",
    "Component",
    "Graph",
    "Matmul",
    "Plan",
    "Precision",
    "QuantizedModel",
    "capture",
    "compile",
    "data",
    "evaluate",
    "export",
    "formats",
    "load_model",
    "models",
    "search",
    "studies",
]

_LAZY_SUBPACKAGES = ("search", "export", "studies")


def __getattr__(name: str):
    # Heavy optional layers (optuna, onnx) load when first used, not on `import mpqc`.
    if name in _LAZY_SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBPACKAGES))
