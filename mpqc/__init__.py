"""mpqc: a mixed-precision quantization compiler for language models."""

from . import formats

__version__ = "0.1.0"
__all__ = ["formats"]
