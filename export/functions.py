"""Activation quantization as ONNX functions in the ``mpqc`` domain, bodies of standard ops.

Four functions, one per format family, each ``Y = F(X)`` with the same shape and type:

    mpqc.MXQuantizeDequantize      OCP MX (mxint8 mxint4 mxfp8_e4m3 mxfp8_e5m2 mxfp6_* mxfp4)
    mpqc.NVFP4QuantizeDequantize   nvfp4: E2M1 elements, E4M3 block scales under an fp32 tensor scale
    mpqc.AbsmaxQuantizeDequantize  int3 ... int8, fp4_e2m1: a float32 scale per block (absmax / max)
    mpqc.CastQuantizeDequantize    bf16 fp16: a round trip through the narrower float type

Every call carries ``format`` (the mpqc format name), ``block_size`` (a positive int, -1 for
"vector": the whole axis, -2 for "tensor": one block), ``axis`` (the non-negative axis the
blocks run along: the matmul's reduction axis) and ``rounding`` ("nearest": ties away from
zero, or "even"). A toolchain that knows an op matches it by name and reads those. The bodies
cannot branch on strings, so calls also carry the numbers the body computes with, derived
from the format (``ties_even``, ``elem_emax``, ``elem_emin``, ``elem_mbits``, ``elem_max``;
see ``call_attributes``); docs/onnx.md lists them.

The arithmetic is mpqc.formats.reference's, step for step, in float32, so ONNX Runtime
reproduces ``mpqc.formats.quantize`` bit for bit (tests/test_export.py checks every format):

- the exact floor(log2 a) that the reference reads from float bits comes from a Log estimate
  corrected by exact comparisons with powers of two from a table (ONNX has no bit cast below
  opset 26), and 2**e is a lookup in that table;
- integer elements (k / 2**frac_bits, |k| <= qmax) are minifloats whose exponent never
  leaves its minimum: elem_emin = bits - 1 - frac_bits, elem_mbits = bits - 1;
- ReduceMax in ONNX Runtime skips NaN, so a block's NaN/Inf is found by summing x * 0;
- NVFP4's round to E4M3 (round to nearest even) is the element rounding with E4M3's grid.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper

from mpqc.formats import Format, get_format

DOMAIN = "mpqc"
DOMAIN_VERSION = 1
MX_OP = "MXQuantizeDequantize"
NVFP4_OP = "NVFP4QuantizeDequantize"
ABSMAX_OP = "AbsmaxQuantizeDequantize"
CAST_OP = "CastQuantizeDequantize"
OP_OF_FAMILY = {"mx": MX_OP, "nvfp4": NVFP4_OP, "absmax": ABSMAX_OP, "cast": CAST_OP}

BLOCK_CODES = {"vector": -1, "tensor": -2}
CAST_TYPES = {"bfloat16": TensorProto.BFLOAT16, "float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT}

# Attributes of each function: (name, type). The first four are the interface; the rest are
# derived from the format so that one body serves every format of a family.
_COMMON = [
    ("format", AttributeProto.STRING),
    ("block_size", AttributeProto.INT),
    ("axis", AttributeProto.INT),
    ("rounding", AttributeProto.STRING),
    ("ties_even", AttributeProto.INT),
]
_ELEMENT = [("elem_emin", AttributeProto.INT), ("elem_mbits", AttributeProto.INT), ("elem_max", AttributeProto.FLOAT)]
ATTRIBUTES = {
    MX_OP: _COMMON + [("elem_emax", AttributeProto.INT)] + _ELEMENT,
    NVFP4_OP: _COMMON,
    ABSMAX_OP: _COMMON + _ELEMENT,
    CAST_OP: [("format", AttributeProto.STRING), ("to", AttributeProto.INT)],
}

# 2**e for e in [POW2_MIN, POW2_MAX]: 2**-150 rounds to 0 and 2**128 to inf in float32, which
# the exponent corrections below rely on at the ends of the range.
POW2_MIN, POW2_MAX = -150, 128
NVFP4_ELEMENT_MAX = 6.0
NVFP4_SCALE_MAX = 448.0


def block_code(block) -> int:
    """A format's block size as the ``block_size`` attribute: size, -1 vector, -2 tensor."""
    return BLOCK_CODES.get(block, block) if isinstance(block, str) else int(block)


def block_from_code(code: int):
    return {-1: "vector", -2: "tensor"}.get(code, code)


def element_params(element) -> dict:
    """The minifloat view of an element type: smallest exponent, mantissa bits, largest value."""
    if element.kind == "int":
        return {
            "elem_emin": element.bits - 1 - element.frac_bits,
            "elem_mbits": element.bits - 1,
            "elem_max": float(element.max_normal),
        }
    return {"elem_emin": element.emin, "elem_mbits": element.man_bits, "elem_max": float(element.max_normal)}


def call_attributes(fmt: Format, axis: int, rounding: str) -> tuple[str, dict]:
    """(op_type, attributes) of the function call that fake-quantizes like ``quantize(x, fmt, ...)``.

    ``fmt`` carries the block size in force; ``axis`` must already be non-negative."""
    if get_format(fmt.name).with_block(fmt.block_size) != fmt:
        raise ValueError(f"format {fmt.name!r} ({fmt}) is not a preset; only preset formats export")
    if fmt.family == "cast":
        return CAST_OP, {"format": fmt.name, "to": CAST_TYPES[fmt.cast_dtype]}
    if axis < 0:
        raise ValueError(f"axis must be non-negative here, got {axis}")
    attrs = {
        "format": fmt.name,
        "block_size": block_code(fmt.block_size),
        "axis": int(axis),
        "rounding": rounding,
        "ties_even": int(rounding == "even"),
    }
    if fmt.family == "mx":
        attrs["elem_emax"] = fmt.element.emax
    if fmt.family in ("mx", "absmax"):
        attrs.update(element_params(fmt.element))
    return OP_OF_FAMILY[fmt.family], attrs


# ---- building bodies ----------------------------------------------------------------------------


class _Ref:
    """An attribute of a body node that refers to one of the function's own attributes."""

    def __init__(self, name: str, type_: int):
        self.name, self.type = name, type_


class _Body:
    """Nodes of a function body with generated value names."""

    def __init__(self, prefix: str):
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = prefix
        self._n = 0

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self._n += 1
        out = f"{self.prefix}{self._n}_{op_type}"
        node = helper.make_node(
            op_type, list(inputs), [out], **{k: v for k, v in attrs.items() if not isinstance(v, _Ref)}
        )
        for k, v in attrs.items():
            if isinstance(v, _Ref):
                a = AttributeProto(name=k, ref_attr_name=v.name, type=v.type)
                node.attribute.append(a)
        self.nodes.append(node)
        return out

    def const(self, value, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        return self.op("Constant", value=onnx.numpy_helper.from_array(arr))

    def attr_int(self, name: str) -> str:
        """A 1-element int64 tensor holding the int attribute ``name``."""
        scalar = self.op("Constant", value_int=_Ref(name, AttributeProto.INT))
        return self.op("Reshape", scalar, self.const([1], np.int64))

    def attr_float(self, name: str) -> str:
        return self.op("Constant", value_float=_Ref(name, AttributeProto.FLOAT))


@functools.cache
def pow2_table() -> np.ndarray:
    """float32 2**e for e = POW2_MIN .. POW2_MAX (index e - POW2_MIN); exact, 0 and inf at the ends."""
    with np.errstate(over="ignore"):  # 2**128 -> inf on purpose
        return np.ldexp(np.float64(1.0), np.arange(POW2_MIN, POW2_MAX + 1)).astype(np.float32)


class _Quantizer:
    """Emits the reference arithmetic into a body."""

    def __init__(self, b: _Body):
        self.b = b
        self.table = b.const(pow2_table())
        self.zero_f = b.const(0.0)
        self.one_f = b.const(1.0)
        self.one_i = b.const([1], np.int64)
        self.zero_i = b.const([0], np.int64)

    def pow2(self, e: str) -> str:
        """2**e for int64 e in [POW2_MIN, POW2_MAX]."""
        b = self.b
        return b.op("Gather", self.table, b.op("Sub", e, b.const(POW2_MIN, np.int64)))

    def floor_log2_at_least(self, a: str, lo: str) -> str:
        """max(floor(log2 a), lo) as int64 for float a >= 0 (not NaN); lo an int64 tensor."""
        b = self.b
        est = b.op("Floor", b.op("Mul", b.op("Log", a), b.const(1.0 / math.log(2.0))))
        est = b.op("Min", b.op("Max", est, b.op("Cast", lo, to=TensorProto.FLOAT)), b.const(127.0))
        e = b.op("Cast", est, to=TensorProto.INT64)
        # The estimate is within one of the truth; two exact comparisons settle it.
        too_high = b.op("Cast", b.op("Greater", self.pow2(e), a), to=TensorProto.INT64)
        e = b.op("Max", b.op("Sub", e, too_high), lo)
        too_low = b.op(
            "Cast", b.op("LessOrEqual", self.pow2(b.op("Add", e, b.const(1, np.int64))), a), to=TensorProto.INT64
        )
        return b.op("Add", e, too_low)

    def round_half(self, r: str, even: str) -> str:
        """Round r >= 0: ties away from zero (floor(r + 0.5)) or, where ``even``, to even."""
        b = self.b
        nearest = b.op("Floor", b.op("Add", r, b.const(0.5)))
        return b.op("Where", even, b.op("Round", r), nearest)

    def element(self, v: str, emin: str, mbits: str, vmax: str, even: str) -> str:
        """quantize_element: v (already divided by its scale) onto the element grid, saturating."""
        b = self.b
        a = b.op("Abs", v)
        a = b.op("Where", b.op("IsNaN", a), self.zero_f, a)  # NaN comes back through the scale
        exponent = self.floor_log2_at_least(a, emin)
        step = self.pow2(b.op("Sub", exponent, mbits))
        r = b.op("Mul", self.round_half(b.op("Div", a, step), even), step)
        r = b.op("Min", r, vmax)
        return b.op("Where", b.op("Less", v, self.zero_f), b.op("Neg", r), r)

    # ---- blocking ----------------------------------------------------------------------------
    def to_blocks(self, xf: str):
        """xf as [pre, n_blocks, block, post] (zero padded) and what from_blocks needs."""
        b = self.b
        shape = b.op("Shape", xf)
        axis = b.attr_int("axis")
        block = b.attr_int("block_size")
        big = b.const([np.iinfo(np.int64).max], np.int64)
        after = b.op("Add", axis, self.one_i)
        pre = b.op(
            "ReduceProd", b.op("Concat", self.one_i, b.op("Slice", shape, self.zero_i, axis), axis=0), keepdims=1
        )
        post = b.op("ReduceProd", b.op("Concat", self.one_i, b.op("Slice", shape, after, big), axis=0), keepdims=1)
        length = b.op("Slice", shape, axis, after)
        numel = b.op("ReduceProd", b.op("Concat", self.one_i, shape, axis=0), keepdims=1)
        per_tensor = b.op("Equal", block, b.const([-2], np.int64))
        pre = b.op("Where", per_tensor, self.one_i, pre)
        post = b.op("Where", per_tensor, self.one_i, post)
        length = b.op("Where", per_tensor, numel, length)
        size = b.op("Where", b.op("Greater", block, self.zero_i), block, length)
        size = b.op("Max", size, self.one_i)
        n_blocks = b.op("Div", b.op("Sub", b.op("Add", length, size), self.one_i), size)
        padded = b.op("Mul", n_blocks, size)
        x3 = b.op("Reshape", xf, b.op("Concat", pre, length, post, axis=0), allowzero=1)
        pads = b.op(
            "Concat",
            self.zero_i,
            self.zero_i,
            self.zero_i,
            self.zero_i,
            b.op("Sub", padded, length),
            self.zero_i,
            axis=0,
        )
        x3 = b.op("Pad", x3, pads)
        x4 = b.op("Reshape", x3, b.op("Concat", pre, n_blocks, size, post, axis=0), allowzero=1)
        return x4, (shape, pre, padded, post, length)

    def from_blocks(self, y4: str, info) -> str:
        b = self.b
        shape, pre, padded, post, length = info
        y3 = b.op("Reshape", y4, b.op("Concat", pre, padded, post, axis=0), allowzero=1)
        y3 = b.op("Slice", y3, self.zero_i, length, self.one_i)
        return b.op("Reshape", y3, shape, allowzero=1)

    def block_amax(self, x4: str) -> str:
        """Per-block max |x|, NaN where the block holds NaN or Inf (ReduceMax alone skips NaN)."""
        b = self.b
        axes = b.const([2], np.int64)
        amax = b.op("ReduceMax", b.op("Abs", x4), axes, keepdims=1)
        probe = b.op("ReduceSum", b.op("Mul", x4, self.zero_f), axes, keepdims=1)  # 0, or NaN
        return b.op("Add", amax, probe)

    def finite(self, t: str) -> str:
        b = self.b
        return b.op("Not", b.op("Or", b.op("IsNaN", t), b.op("IsInf", t)))


def _function(op_type: str, nodes, opset: int, doc: str) -> onnx.FunctionProto:
    return helper.make_function(
        DOMAIN,
        op_type,
        ["X"],
        ["Y"],
        nodes,
        [helper.make_opsetid("", opset)],
        attributes=[name for name, _ in ATTRIBUTES[op_type]],
        doc_string=doc,
    )


def _scaled_body(op_type: str, b: _Body, scale_and_elements) -> list:
    q = _Quantizer(b)
    xf = b.op("Cast", "X", to=TensorProto.FLOAT)
    x4, info = q.to_blocks(xf)
    even = b.op("Cast", b.op("Constant", value_int=_Ref("ties_even", AttributeProto.INT)), to=TensorProto.BOOL)
    y4 = scale_and_elements(q, xf, x4, even)
    yf = q.from_blocks(y4, info)
    b.nodes.append(helper.make_node("CastLike", [yf, "X"], ["Y"]))
    return b.nodes


def _mx(q: _Quantizer, xf, x4, even):
    b = q.b
    amax = q.block_amax(x4)
    finite = q.finite(amax)
    amax = b.op("Where", finite, amax, q.one_f)
    # Shared exponent floor(log2 amax) - emax; an all-zero block takes -126, as the reference does.
    e = q.floor_log2_at_least(amax, b.const(-127, np.int64))
    e = b.op("Where", b.op("Greater", amax, q.zero_f), e, b.const(-126, np.int64))
    shared = b.op("Sub", e, b.op("Constant", value_int=_Ref("elem_emax", AttributeProto.INT)))
    valid = b.op("And", finite, b.op("LessOrEqual", shared, b.const(127, np.int64)))
    shared = b.op("Min", b.op("Max", shared, b.const(-127, np.int64)), b.const(127, np.int64))
    scale = b.op("Where", valid, q.pow2(shared), b.const(np.nan))
    elements = q.element(b.op("Div", x4, scale), *_element_attrs(b), even)
    return b.op("Mul", elements, scale)


def _element_attrs(b: _Body):
    return (
        b.op("Constant", value_int=_Ref("elem_emin", AttributeProto.INT)),
        b.op("Constant", value_int=_Ref("elem_mbits", AttributeProto.INT)),
        b.attr_float("elem_max"),
    )


def _absmax(q: _Quantizer, xf, x4, even):
    b = q.b
    amax = q.block_amax(x4)
    scale = b.op("Where", q.finite(amax), b.op("Div", amax, b.attr_float("elem_max")), b.const(np.nan))
    safe = b.op("Where", b.op("Equal", scale, q.zero_f), q.one_f, scale)
    elements = q.element(b.op("Div", x4, safe), *_element_attrs(b), even)
    return b.op("Mul", elements, scale)


def _nvfp4(q: _Quantizer, xf, x4, even):
    from mpqc.formats.spec import E2M1, E4M3

    b = q.b
    # Tensor scale from the whole tensor's amax; NaN/Inf anywhere makes every output NaN, as in
    # the reference, so one probe over the tensor suffices.
    tensor_amax = b.op(
        "Add", b.op("ReduceMax", b.op("Abs", xf), keepdims=0), b.op("ReduceSum", b.op("Mul", xf, q.zero_f), keepdims=0)
    )
    ts = b.op("Div", tensor_amax, b.const(NVFP4_ELEMENT_MAX * NVFP4_SCALE_MAX))
    ts = b.op("Where", b.op("Equal", ts, q.zero_f), q.one_f, ts)
    axes = b.const([2], np.int64)
    amax = b.op("ReduceMax", b.op("Abs", x4), axes, keepdims=1)
    wanted = b.op("Div", amax, b.op("Mul", b.const(NVFP4_ELEMENT_MAX), ts))
    wanted = b.op("Min", wanted, b.const(NVFP4_SCALE_MAX))
    p8 = element_params(E4M3)
    fp8 = q.element(
        wanted,
        b.const(p8["elem_emin"], np.int64),
        b.const(p8["elem_mbits"], np.int64),
        b.const(p8["elem_max"]),
        b.const(True, np.bool_),
    )
    fp8 = b.op("Where", b.op("IsNaN", wanted), wanted, fp8)
    scale = b.op("Mul", fp8, ts)
    safe = b.op("Where", b.op("Equal", scale, q.zero_f), q.one_f, scale)
    p4 = element_params(E2M1)
    elements = q.element(
        b.op("Div", x4, safe),
        b.const(p4["elem_emin"], np.int64),
        b.const(p4["elem_mbits"], np.int64),
        b.const(p4["elem_max"]),
        even,
    )
    return b.op("Mul", elements, scale)


@functools.cache
def function_proto(op_type: str, opset: int) -> onnx.FunctionProto:
    """The FunctionProto of ``mpqc.<op_type>`` with a body at ``opset`` of the default domain."""
    if op_type == CAST_OP:
        nodes = [helper.make_node("Cast", ["X"], ["T"]), helper.make_node("CastLike", ["T", "X"], ["Y"])]
        nodes[0].attribute.append(AttributeProto(name="to", ref_attr_name="to", type=AttributeProto.INT))
        return _function(op_type, nodes, opset, "Round X to the float type `to` and back (mpqc bf16/fp16).")
    family = {MX_OP: _mx, ABSMAX_OP: _absmax, NVFP4_OP: _nvfp4}[op_type]
    docs = {
        MX_OP: "OCP MX v1.0 fake quantization: shared E8M0 exponent floor(log2 amax) - elem_emax per block, "
        "saturating element rounding; equals mpqc.formats.quantize.",
        ABSMAX_OP: "Absmax fake quantization: float32 scale amax / elem_max per block; equals mpqc.formats.quantize.",
        NVFP4_OP: "NVFP4 fake quantization: fp32 tensor scale, E4M3 block scales, E2M1 elements; "
        "equals mpqc.formats.quantize.",
    }
    return _function(op_type, _scaled_body(op_type, _Body("t"), family), opset, docs[op_type])


# ---- a standalone model for checking a function against mpqc.formats.quantize ------------------------


def quantize_model(
    fmt, *, rank: int, axis: int = -1, block_size=None, rounding: str = "nearest", opset: int = 21
) -> onnx.ModelProto:
    """A one-node ONNX model computing ``quantize(x, fmt, block_size=..., axis=..., rounding=...)``
    for float32 inputs of rank ``rank`` (every dim dynamic)."""
    fmt = get_format(fmt)
    if fmt.family != "cast":
        fmt = fmt.with_block(block_size)
    op_type, attrs = call_attributes(fmt, axis % rank, rounding)
    node = helper.make_node(op_type, ["x"], ["y"], domain=DOMAIN, **attrs)
    dims = [f"d{i}" for i in range(rank)]
    graph = helper.make_graph(
        [node],
        f"mpqc_{fmt.name}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        functions=[function_proto(op_type, opset)],
    )


__all__ = [
    "ABSMAX_OP",
    "ATTRIBUTES",
    "CAST_OP",
    "DOMAIN",
    "DOMAIN_VERSION",
    "MX_OP",
    "NVFP4_OP",
    "block_code",
    "block_from_code",
    "call_attributes",
    "function_proto",
    "quantize_model",
]
