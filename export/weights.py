"""Weights in their low-bit form: ONNX initializers plus the nodes that decode them.

Every form decodes to exactly the fake-quantized weight the compiled model multiplies by
(``mpqc.formats.pack(w, ...).unpack()``, which equals ``quantize``), because each is the
same product of an exact element value and an exact scale in float32:

- integer elements (mxint8, mxint4, int8, int4): INT8/INT4 initializers (two's complement,
  4-bit packed two per byte) in the weight's own layout, float32 scales, and
  ``DequantizeLinear`` with ``axis`` and ``block_size`` (opset 21), which ONNX Runtime runs.
  An MX block's E8M0 exponent e becomes the float scale 2**(e - 127 - frac_bits): the
  element k / 2**frac_bits times 2**(e - 127) is k times that scale.
- float elements, ``fp_weights="table"`` (default; ONNX Runtime runs it): the element codes
  bit-packed into uint8 exactly as ``PackedTensor.codes`` stores them (blocks along the
  reduction axis moved last), decoded by ``Gather`` from a small value table (4-bit: a
  256 x 2 table of byte -> two values; 8-bit: 256 values; 6-bit: 3 bytes -> 4 codes with
  integer arithmetic, then 64 values), times the block scales: E8M0 codes through a
  256-entry table of powers of two (MX), E4M3 codes through their value table times the
  fp32 tensor scale (NVFP4), or float32 (fp4_e2m1).
- float elements, ``fp_weights="standard"``: the standard types FLOAT4E2M1 / FLOAT8E4M3FN /
  FLOAT8E5M2 (FLOAT6E2M3 / FLOAT6E3M2 from opset 28) with FLOAT8E8M0 scales (MX), FLOAT8E4M3FN
  scales cast to float times the tensor scale (NVFP4) or float32 scales, through
  ``DequantizeLinear`` (opset 25). onnx.checker and onnx.reference run it; ONNX Runtime has
  no kernel for it yet.
- casts (bf16, fp16): a BFLOAT16/FLOAT16 initializer and ``Cast`` to float.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import onnx_ir as ir
import torch

from mpqc.formats import code_table, pack, quantize
from mpqc.formats.packing import PackedTensor, element_codes, pack_bits
from mpqc.formats.reference import pow2

from .markers import UnsupportedExport, WeightRecord

TABLE = "table"
STANDARD = "standard"
FP_WEIGHT_FORMS = (TABLE, STANDARD)

# Storage kinds, as written in each weight node's "mpqc.storage" metadata.
STORAGE_INT_DQ = "int_dequantize_linear"
STORAGE_TABLE = "lookup_table"
STORAGE_STANDARD_DQ = "standard_dequantize_linear"
STORAGE_CAST = "cast"

_STANDARD_TYPES = {  # element -> (ONNX type, first opset where DequantizeLinear takes it)
    "e2m1": (ir.DataType.FLOAT4E2M1, 25),
    "e4m3": (ir.DataType.FLOAT8E4M3FN, 25),
    "e5m2": (ir.DataType.FLOAT8E5M2, 25),
    "e2m3": (ir.DataType.FLOAT6E2M3, 28),
    "e3m2": (ir.DataType.FLOAT6E3M2, 28),
}


@dataclasses.dataclass
class EncodedWeight:
    """The decoding of one weight: nodes to insert (in order), their initializers, the float output."""

    output: ir.Value
    nodes: list[ir.Node]
    initializers: list[ir.Value]
    storage: str
    nbytes: int  # bytes of this weight's own initializers (shared tables not counted)
    details: dict  # what the storage holds, for node metadata


class WeightEncoder:
    """Encodes weights for one model; shares the small decode tables between them."""

    def __init__(self, *, fp_weights: str = TABLE, opset: int = 21):
        if fp_weights not in FP_WEIGHT_FORMS:
            raise ValueError(f"fp_weights must be one of {', '.join(FP_WEIGHT_FORMS)}, got {fp_weights!r}")
        self.fp_weights = fp_weights
        self.opset = opset
        self.shared: dict[str, ir.Value] = {}  # name -> initializer, added to the graph once
        self._names: set[str] = set()

    # ---- helpers ---------------------------------------------------------------------------
    def _unique(self, name: str) -> str:
        base, n = name, 1
        while name in self._names:
            n += 1
            name = f"{base}_{n}"
        self._names.add(name)
        return name

    def _shared_table(self, name: str, make) -> ir.Value:
        if name not in self.shared:
            self.shared[name] = ir.Value(name=name, const_value=ir.Tensor(make(), name=name))
            self.shared[name].shape = self.shared[name].const_value.shape
            self.shared[name].dtype = self.shared[name].const_value.dtype
        return self.shared[name]

    def check_supported(self, record: WeightRecord) -> None:
        """Raise UnsupportedExport, naming the weight and format, for what this form cannot write."""
        fmt = record.format
        if fmt.family == "cast" or fmt.element.kind == "int":
            return
        if self.fp_weights == STANDARD:
            onnx_type, first = _STANDARD_TYPES[fmt.element.name]
            if self.opset < first:
                raise UnsupportedExport(
                    f"weight {record.weight} of {', '.join(record.matmuls)}: format {fmt.name} has no standard ONNX "
                    f"form at opset {self.opset} ({onnx_type.name} data in DequantizeLinear needs opset {first}); "
                    f"export with opset={first}, or with fp_weights='table'"
                )

    def encode(
        self, record: WeightRecord, weight: torch.Tensor, *, expected: torch.Tensor | None = None, verify: bool = True
    ) -> EncodedWeight:
        """The ONNX form of ``weight`` in ``record``'s format, along its reduction axis.

        With ``verify``, the stored codes and scales are decoded here and compared with
        ``expected`` (the compiled model's quantized weight; computed when not given): a
        mismatch raises instead of writing a file that computes something else."""
        self.check_supported(record)
        fmt = record.format
        weight = weight.detach().to("cpu")
        prefix = self._unique(f"{record.weight}.{fmt.name}")
        if fmt.family == "cast":
            return self._cast(record, weight, prefix)
        packed = pack(weight, fmt, block_size=fmt.block_size, axis=record.axis, rounding=record.rounding)
        if verify:
            if expected is None:
                expected = quantize(weight, fmt, block_size=fmt.block_size, axis=record.axis, rounding=record.rounding)
            got = packed.unpack()
            same = (got == expected) | (got.isnan() & expected.isnan())
            if not bool(same.all()):
                raise RuntimeError(
                    f"weight {record.weight}: packed {fmt.name} codes do not decode to the quantized "
                    f"weight ({int((~same).sum())} elements differ); a bug in mpqc.formats.pack"
                )
        if fmt.element.kind == "int":
            return self._int_dq(record, packed, prefix)
        if self.fp_weights == STANDARD:
            return self._standard_dq(record, packed, prefix)
        return self._table(record, packed, prefix)

    # ---- the forms -------------------------------------------------------------------------------
    def _cast(self, record, weight, prefix) -> EncodedWeight:
        dtype = getattr(torch, record.format.cast_dtype)
        onnx_type = {torch.bfloat16: ir.DataType.BFLOAT16, torch.float16: ir.DataType.FLOAT16}[dtype]
        data = weight.to(dtype).contiguous()
        raw = data.view(torch.uint16).numpy() if dtype == torch.bfloat16 else data.numpy()
        init = _init(f"{prefix}.data", ir.Tensor(raw, dtype=onnx_type, shape=ir.Shape(tuple(weight.shape))))
        tape = ir.tape.Tape()
        out = tape.op("Cast", [init], {"to": ir.DataType.FLOAT}, name=f"{prefix}/Cast")
        return EncodedWeight(
            out, list(tape.nodes), [init], STORAGE_CAST, data.numel() * 2, {"data_type": onnx_type.name}
        )

    def _int_dq(self, record, packed: PackedTensor, prefix) -> EncodedWeight:
        fmt = packed.format
        element = fmt.element
        values = _to_layout(packed.element_values(), packed)
        k = torch.round(values * 2.0**element.frac_bits).to(torch.int32)
        if fmt.family == "mx":
            code = packed.scales.to(torch.int32)
            scales = torch.where(code == 255, float("nan"), pow2(code - 127 - element.frac_bits))
        else:
            scales = packed.scales.to(torch.float32)
        scales = _scales_to_layout(scales, packed)
        shape = tuple(packed.shape)
        # ONNX's integer types are INT4 and INT8: narrower elements (int3; int5-int7) are stored
        # in the next one up, their values unchanged.
        if element.bits <= 4:
            data = ir.PackedTensor(pack_bits(k & 15, 4).numpy(), ir.DataType.INT4, shape=shape)
            onnx_type = ir.DataType.INT4
        elif element.bits <= 8:
            data = ir.Tensor(k.to(torch.int8).numpy())
            onnx_type = ir.DataType.INT8
        else:
            raise UnsupportedExport(
                f"weight {record.weight}: {element.bits}-bit integer elements of {fmt.name} have no ONNX integer type"
            )
        data_v = _init(f"{prefix}.data", data)
        scale_v = _init(f"{prefix}.scales", ir.Tensor(scales.contiguous().numpy()))
        tape = ir.tape.Tape()
        out = tape.op("DequantizeLinear", [data_v, scale_v], _dq_attrs(packed), name=f"{prefix}/DequantizeLinear")
        nbytes = data.nbytes + scales.numel() * 4
        return EncodedWeight(
            out,
            list(tape.nodes),
            [data_v, scale_v],
            STORAGE_INT_DQ,
            nbytes,
            {"data_type": onnx_type.name, "scale_type": "FLOAT"},
        )

    def _table(self, record, packed: PackedTensor, prefix) -> EncodedWeight:
        fmt = packed.format
        element = fmt.element
        info = packed.blocking
        bits = element.bits
        count = packed.scales.numel() * info.block
        codes = packed.codes
        if bits == 6 and codes.numel() % 3:
            codes = torch.cat([codes, codes.new_zeros(3 - codes.numel() % 3)])
        tape = ir.tape.Tape()
        n = [0]

        def op(op_type, inputs, attrs=None):
            n[0] += 1
            return tape.op(op_type, inputs, attrs, name=f"{prefix}/{op_type}_{n[0]}")

        codes_v = _init(f"{prefix}.codes", ir.Tensor(codes.numpy()))
        inits = [codes_v]
        idx = op("Cast", [codes_v], {"to": ir.DataType.INT32})
        if bits == 8:
            table = self._shared_table(f"mpqc.table.{element.name}", lambda: code_table(element).numpy())
            values = op("Gather", [table, idx])
            decoded = codes.numel()
        elif bits == 4:
            table = self._shared_table(f"mpqc.table.{element.name}.byte_pairs", lambda: _byte_pair_table(element))
            values = op("Reshape", [op("Gather", [table, idx]), self._const_i64("mpqc.const.minus_one", [-1])])
            decoded = 2 * codes.numel()
        elif bits == 6:
            table = self._shared_table(f"mpqc.table.{element.name}", lambda: code_table(element).numpy())
            groups = op("Reshape", [idx, self._const_i64("mpqc.const.groups_of_3", [-1, 3])])
            weights = self._shared_table("mpqc.const.byte_weights", lambda: np.array([1, 256, 65536], np.int32))
            word = op(
                "ReduceSum", [op("Mul", [groups, weights]), self._const_i64("mpqc.const.one", [1])], {"keepdims": 1}
            )
            divisors = self._shared_table(
                "mpqc.const.six_bit_shifts", lambda: np.array([1, 64, 4096, 262144], np.int32)
            )
            sixty_four = self._shared_table("mpqc.const.sixty_four", lambda: np.array(64, np.int32))
            code6 = op("Mod", [op("Div", [word, divisors]), sixty_four])
            values = op("Gather", [table, op("Reshape", [code6, self._const_i64("mpqc.const.minus_one", [-1])])])
            decoded = 4 * codes.numel() // 3
        else:
            raise UnsupportedExport(f"weight {record.weight}: no table decoding for {bits}-bit elements of {fmt.name}")
        if decoded != count:
            values = op(
                "Slice", [values, self._const_i64("mpqc.const.zero", [0]), _init_i64(f"{prefix}.count", [count], inits)]
            )
        blocked = tuple(packed.scales.shape) + (info.block,)
        values = op("Reshape", [values, _init_i64(f"{prefix}.blocked_shape", blocked, inits)])
        scale_codes = packed.scales.reshape(*packed.scales.shape, 1)
        if fmt.family == "mx":
            s_v = _init(f"{prefix}.scales", ir.Tensor(scale_codes.contiguous().numpy()))
            inits.append(s_v)
            table = self._shared_table("mpqc.table.e8m0", _e8m0_table)
            scale = op("Gather", [table, op("Cast", [s_v], {"to": ir.DataType.INT32})])
            details = {"codes": f"uint8, {bits}-bit {element.name} packed", "scales": "uint8 E8M0"}
        elif fmt.family == "nvfp4":
            s_v = _init(f"{prefix}.scales", ir.Tensor(scale_codes.contiguous().numpy()))
            ts_v = _init(f"{prefix}.tensor_scale", ir.Tensor(packed.tensor_scale.reshape(()).to(torch.float32).numpy()))
            inits += [s_v, ts_v]
            from mpqc.formats.spec import E4M3

            table = self._shared_table("mpqc.table.e4m3", lambda: code_table(E4M3).numpy())
            scale = op("Mul", [op("Gather", [table, op("Cast", [s_v], {"to": ir.DataType.INT32})]), ts_v])
            details = {
                "codes": f"uint8, {bits}-bit {element.name} packed",
                "scales": "uint8 FP8-E4M3 x float32 tensor scale",
            }
        else:
            s_v = _init(f"{prefix}.scales", ir.Tensor(scale_codes.to(torch.float32).contiguous().numpy()))
            inits.append(s_v)
            scale = s_v
            details = {"codes": f"uint8, {bits}-bit {element.name} packed", "scales": "float32"}
        out = op("Mul", [values, scale])
        out = self._unblock(out, packed, prefix, inits, op)
        nbytes = sum(v.const_value.nbytes for v in inits)
        return EncodedWeight(out, list(tape.nodes), inits, STORAGE_TABLE, nbytes, details)

    def _unblock(self, out, packed: PackedTensor, prefix, inits, op):
        """(..., n_blocks, block) values -> the weight's layout."""
        info = packed.blocking
        shape = tuple(packed.shape)
        if info.per_tensor:
            return op("Reshape", [out, _init_i64(f"{prefix}.shape", shape, inits)])
        moved = tuple(info.moved_shape)
        out = op("Reshape", [out, _init_i64(f"{prefix}.padded_shape", moved[:-1] + (info.padded,), inits)])
        if info.padded != info.length:
            out = op(
                "Slice",
                [
                    out,
                    self._const_i64("mpqc.const.zero", [0]),
                    _init_i64(f"{prefix}.length", [info.length], inits),
                    self._const_i64("mpqc.const.minus_one", [-1]),
                ],
            )
        rank = len(shape)
        if info.axis != rank - 1:
            perm = [rank - 1 if j == info.axis else (j if j < info.axis else j - 1) for j in range(rank)]
            out = op("Transpose", [out], {"perm": perm})
        return out

    def _standard_dq(self, record, packed: PackedTensor, prefix) -> EncodedWeight:
        fmt = packed.format
        element = fmt.element
        onnx_type, _ = _STANDARD_TYPES[element.name]
        values = _to_layout(packed.element_values(), packed)
        codes = element_codes(values, element)
        shape = tuple(packed.shape)
        if element.bits in (4, 6):
            data = ir.PackedTensor(pack_bits(codes, element.bits).numpy(), onnx_type, shape=shape)
        else:
            data = ir.Tensor(codes.to(torch.uint8).numpy(), dtype=onnx_type, shape=ir.Shape(shape))
        data_v = _init(f"{prefix}.data", data)
        inits = [data_v]
        tape = ir.tape.Tape()
        attrs = _dq_attrs(packed)
        if fmt.family == "mx":
            codes_s = _scales_to_layout(packed.scales, packed).to(torch.uint8).contiguous()
            s_v = _init(
                f"{prefix}.scales",
                ir.Tensor(codes_s.numpy(), dtype=ir.DataType.FLOAT8E8M0, shape=ir.Shape(tuple(codes_s.shape))),
            )
            inits.append(s_v)
            scale = s_v
            attrs["output_dtype"] = ir.DataType.FLOAT
            details = {"data_type": onnx_type.name, "scale_type": "FLOAT8E8M0"}
        elif fmt.family == "nvfp4":
            codes_s = _scales_to_layout(packed.scales, packed).to(torch.uint8).contiguous()
            s_v = _init(
                f"{prefix}.scales",
                ir.Tensor(codes_s.numpy(), dtype=ir.DataType.FLOAT8E4M3FN, shape=ir.Shape(tuple(codes_s.shape))),
            )
            ts_v = _init(f"{prefix}.tensor_scale", ir.Tensor(packed.tensor_scale.reshape(()).to(torch.float32).numpy()))
            inits += [s_v, ts_v]
            scale = tape.op(
                "Mul",
                [tape.op("Cast", [s_v], {"to": ir.DataType.FLOAT}, name=f"{prefix}/Cast"), ts_v],
                name=f"{prefix}/Mul",
            )
            details = {"data_type": onnx_type.name, "scale_type": "FLOAT8E4M3FN x float32 tensor scale"}
        else:
            s = _scales_to_layout(packed.scales.to(torch.float32), packed).contiguous()
            s_v = _init(f"{prefix}.scales", ir.Tensor(s.numpy()))
            inits.append(s_v)
            scale = s_v
            details = {"data_type": onnx_type.name, "scale_type": "FLOAT"}
        out = tape.op("DequantizeLinear", [data_v, scale], attrs, name=f"{prefix}/DequantizeLinear")
        nbytes = sum(v.const_value.nbytes for v in inits)
        return EncodedWeight(out, list(tape.nodes), inits, STORAGE_STANDARD_DQ, nbytes, details)

    def _const_i64(self, name: str, values) -> ir.Value:
        return self._shared_table(name, lambda: np.array(values, np.int64))


# ---- layout helpers ---------------------------------------------------------------------------------


def _init(name: str, tensor) -> ir.Value:
    tensor.name = name
    v = ir.Value(name=name, const_value=tensor)
    v.shape = tensor.shape
    v.dtype = tensor.dtype
    return v


def _init_i64(name: str, values, inits: list) -> ir.Value:
    v = _init(name, ir.Tensor(np.array(values, np.int64)))
    inits.append(v)
    return v


def _to_layout(blocked: torch.Tensor, packed: PackedTensor) -> torch.Tensor:
    """(..., n_blocks, block) values in the blocked layout -> the tensor's own layout."""
    info = packed.blocking
    if info.per_tensor:
        return blocked.reshape(-1)[: info.length].reshape(packed.shape)
    flat = blocked.reshape(*info.moved_shape[:-1], -1)[..., : info.length]
    return flat.movedim(-1, info.axis)


def _scales_to_layout(scales: torch.Tensor, packed: PackedTensor) -> torch.Tensor:
    """Per-block scales (..., n_blocks) -> the shape DequantizeLinear wants (blocked axis in place)."""
    if packed.blocking.per_tensor:
        return scales.reshape(())
    return scales.movedim(-1, packed.blocking.axis)


def _dq_attrs(packed: PackedTensor) -> dict:
    info = packed.blocking
    if info.per_tensor:
        return {}
    return {"axis": info.axis, "block_size": info.block}


@functools.cache
def _byte_pair_table_cached(element) -> np.ndarray:
    t = code_table(element).numpy()
    b = np.arange(256)
    return np.stack([t[b & 15], t[b >> 4]], axis=1).astype(np.float32)


def _byte_pair_table(element) -> np.ndarray:
    return _byte_pair_table_cached(element).copy()


def _e8m0_table() -> np.ndarray:
    code = torch.arange(256, dtype=torch.int32)
    return torch.where(code == 255, float("nan"), pow2(code - 127)).numpy()
