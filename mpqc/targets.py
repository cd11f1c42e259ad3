"""Runtimes a plan can be scored as: what each does to the activations entering a matmul.

``target=None`` (mpqc's own): each component's activation format, as its plan says.
``target="llama.cpp"``: the activations llama.cpp's CPU kernels actually compute with. Its
matrix multiplications convert the activation row to the weight type's ``vec_dot_type``
(ggml-cpu's type traits) before the dot products: Q8_0 blocks of 32 for Q4_0, Q5_0, Q8_0 and
MXFP4 weights (and Q8_1, the same values plus block sums, for Q4_1 and Q5_1), Q8_K blocks of 256
for the k-quants, fp16 for F16 weights, bf16 for BF16, nothing for F32. The two attention
matmuls read the KV cache, fp16 by default, so both their operands are fp16.
"""

from __future__ import annotations

from mpqc.formats import Format, get_format
from mpqc.formats.packing import GGUF_STORABLE, gguf_type_name

TARGETS = ("llama.cpp",)
LLAMA_CPP = "llama.cpp"

_VEC_DOT = {
    "Q8_0": "q8_0",
    "Q4_0": "q8_0",
    "Q5_0": "q8_0",
    "MXFP4": "q8_0",
    "Q4_1": "q8_0",  # Q8_1: Q8_0's values and its block sums
    "Q5_1": "q8_0",
    "Q4_K": "q8_k",
    "Q5_K": "q8_k",
    "Q6_K": "q8_k",
}
_FLOAT_VEC_DOT = {"fp32": None, "fp16": "fp16", "bf16": "bf16"}
KV_CACHE_FORMAT = "fp16"


def check_target(target: str | None) -> str | None:
    if target is not None and target not in TARGETS:
        raise ValueError(
            f"unknown target {target!r}; valid: None (mpqc's own activation formats), {', '.join(TARGETS)}"
        )
    return target


def llamacpp_activation(weight: Format | None) -> Format | None:
    """The format llama.cpp's CPU matmul turns activations into for ``weight`` (None: the
    attention matmuls, which read the fp16 KV cache)."""
    if weight is None:
        return get_format(KV_CACHE_FORMAT)
    if weight.family == "cast":
        name = _FLOAT_VEC_DOT[weight.name]
        return None if name is None else get_format(name)
    type_name = gguf_type_name(weight)
    if type_name is None:
        raise ValueError(
            f"format {weight.name!r} has no GGUF type, so llama.cpp cannot run it; "
            f"GGUF stores {', '.join([*GGUF_STORABLE, 'fp32', 'fp16', 'bf16'])}"
        )
    return get_format(_VEC_DOT[type_name])
