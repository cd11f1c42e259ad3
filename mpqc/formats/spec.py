"""Frozen descriptions of number formats: element types, scale types, and the formats built from them.

These are value objects only; the arithmetic lives in ``reference.py`` (and its fast paths).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass

BlockSize = int | str  # a positive int, "vector" (whole reduction axis) or "tensor"
BLOCK_KINDS = ("vector", "tensor")
ROUNDING_MODES = ("nearest", "even")


@dataclass(frozen=True)
class ElementType:
    """One low-precision element type.

    kind "float": a minifloat with ``exp_bits`` exponent and ``man_bits`` explicit mantissa
    bits, exponent ``bias``, subnormals, and ``special`` telling which codes are not numbers:
    "none" (every code is finite: FP4/FP6), "fn" (only S.1111.111 is NaN: FP8-E4M3),
    "ieee" (top exponent holds Inf and NaN: FP8-E5M2).
    kind "int": sign-magnitude range fixed point, value = k * 2**-frac_bits with
    |k| <= 2**(bits-1) - 1 (no -2**(bits-1)); codes are stored in two's complement.
    ``full_range`` admits -2**(bits-1) as well (llama.cpp's Q4_0 codes -8 .. 7).
    kind "uint": unsigned codes 0 .. 2**bits - 1 standing for themselves (the formats with a
    per-block minimum, llama.cpp's Q4_1 and Q4_K: value = scale * code - offset).
    """

    name: str
    kind: str
    bits: int
    exp_bits: int = 0
    man_bits: int = 0
    bias: int = 0
    special: str = "none"
    frac_bits: int = 0
    full_range: bool = False

    def __post_init__(self):
        if self.kind not in ("float", "int", "uint"):
            raise ValueError(f"element {self.name!r}: kind must be 'float', 'int' or 'uint', got {self.kind!r}")
        if self.full_range and self.kind != "int":
            raise ValueError(f"element {self.name!r}: full_range applies to 'int' elements only")
        if self.kind == "float":
            if self.exp_bits < 1 or self.man_bits < 0 or 1 + self.exp_bits + self.man_bits != self.bits:
                raise ValueError(
                    f"element {self.name!r}: a minifloat needs 1 + exp_bits + man_bits == bits, "
                    f"got 1 + {self.exp_bits} + {self.man_bits} != {self.bits}"
                )
            if self.special not in ("none", "fn", "ieee"):
                raise ValueError(f"element {self.name!r}: special must be none, fn or ieee, got {self.special!r}")
        else:
            if not 2 <= self.bits <= 16:
                raise ValueError(f"element {self.name!r}: integer bits must be in [2, 16], got {self.bits}")
            if self.special != "none":
                raise ValueError(f"element {self.name!r}: integer elements have no special codes")

    # ---- derived facts -------------------------------------------------------------------
    @property
    def qmax(self) -> int:
        """Largest integer magnitude of an int element (largest code of a uint one)."""
        return 2**self.bits - 1 if self.kind == "uint" else 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        """Smallest integer an int or uint element takes."""
        if self.kind == "uint":
            return 0
        return -(2 ** (self.bits - 1)) if self.full_range else -self.qmax

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value (floats); subnormals share it."""
        return 1 - self.bias

    @property
    def max_normal(self) -> float:
        if self.kind in ("int", "uint"):
            return self.qmax * 2.0**-self.frac_bits
        top_field = 2**self.exp_bits - 1
        if self.special == "ieee":
            top_field -= 1  # the all-ones exponent is Inf/NaN
        man_max = 2**self.man_bits - 1
        if self.special == "fn":
            man_max -= 1  # S.1111.111 is NaN
        return (1 + man_max / 2**self.man_bits) * 2.0 ** (top_field - self.bias)

    @property
    def min_normal(self) -> float:
        return 2.0**-self.frac_bits if self.kind != "float" else 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0**-self.frac_bits if self.kind != "float" else 2.0 ** (self.emin - self.man_bits)

    @property
    def emax(self) -> int:
        """floor(log2(max_normal)): what the OCP MX shared exponent is offset by."""
        return math.floor(math.log2(self.max_normal))

    def decode(self, code: int) -> float:
        """The value a code stands for (NaN/Inf for the special codes)."""
        if not 0 <= code < 2**self.bits:
            raise ValueError(f"element {self.name!r}: code {code} out of range [0, {2**self.bits})")
        if self.kind == "uint":
            return float(code) * 2.0**-self.frac_bits
        if self.kind == "int":
            k = code - 2**self.bits if code >= 2 ** (self.bits - 1) else code
            if k == -(2 ** (self.bits - 1)) and not self.full_range:
                return math.nan  # the unused most negative code
            return k * 2.0**-self.frac_bits
        sign = -1.0 if code >> (self.bits - 1) else 1.0
        field = (code >> self.man_bits) & (2**self.exp_bits - 1)
        man = code & (2**self.man_bits - 1)
        top = 2**self.exp_bits - 1
        if self.special == "ieee" and field == top:
            return sign * math.inf if man == 0 else math.nan
        if self.special == "fn" and field == top and man == 2**self.man_bits - 1:
            return math.nan
        if field == 0:
            return sign * man * 2.0 ** (self.emin - self.man_bits)
        return sign * (1 + man / 2**self.man_bits) * 2.0 ** (field - self.bias)


@dataclass(frozen=True)
class ScaleType:
    """How a block's scale is stored: "e8m0" (a power of two, OCP MX), "e4m3" (FP8, NVFP4),
    "fp32" (a float32 absmax scale), "fp16" (llama.cpp's block scales), or "none" (plain casts)."""

    name: str
    bits: int

    def __post_init__(self):
        if self.name not in ("e8m0", "e4m3", "fp32", "fp16", "none"):
            raise ValueError(f"scale type must be e8m0, e4m3, fp32, fp16 or none, got {self.name!r}")


@dataclass(frozen=True)
class GgmlLayout:
    """How one llama.cpp (ggml) block type stores its numbers, for the formats of family "ggml".

    ``type_name``: the GGML_TYPE_* name ("Q4_K"). A stored block holds ``super_block`` elements
    (32 for the legacy types, 256 = QK_K for the k-quants) cut into sub-blocks of ``sub_block``
    elements with one scale each. Legacy types store that scale as fp16 (``sub_scale_bits`` 16,
    no super-block scale); k-quants store ``sub_scale_bits``-wide integer scales under fp16
    super-block scales (``super_scale_bits`` 16 each). ``offset``: a minimum per sub-block as
    well (Q4_1: value = d * q + m; Q4_K: value = d * sc * q - dmin * m), with its own scales of
    the same widths. ``extra_bits``: anything else a block stores (Q8_K's 16-bit sums).
    ``block_bytes``: the size of one block in a GGUF file, checked against the parts."""

    type_name: str
    super_block: int
    sub_block: int
    sub_scale_bits: int
    super_scale_bits: int
    offset: bool
    block_bytes: int
    extra_bits: int = 0

    def __post_init__(self):
        if self.super_block % self.sub_block:
            raise ValueError(
                f"{self.type_name}: sub-blocks of {self.sub_block} do not tile blocks of {self.super_block}"
            )

    def check(self, element_bits: int) -> None:
        n_sub = self.super_block // self.sub_block
        scales = (n_sub * self.sub_scale_bits + self.super_scale_bits) * (2 if self.offset else 1)
        bits = self.super_block * element_bits + scales + self.extra_bits
        if bits != 8 * self.block_bytes:
            raise ValueError(f"{self.type_name}: the parts add up to {bits} bits, not {8 * self.block_bytes}")


@dataclass(frozen=True)
class Format:
    """A number format: elements, how blocks of them are scaled, the default block and axis.

    ``family`` picks the arithmetic: "mx" (shared E8M0 exponent, OCP MX v1.0), "absmax"
    (float scale = block absmax / element max), "nvfp4" (E4M3 block scale under an fp32
    tensor scale), "ggml" (llama.cpp's block types, bit for bit as ggml's reference quantizers
    ``quantize_row_*_ref`` compute them; ``ggml`` says how they are stored), or "cast" (a
    plain IEEE cast to ``cast_dtype``).
    """

    name: str
    family: str
    element: ElementType | None
    scale: ScaleType
    block_size: BlockSize | None
    axis: int = -1
    cast_dtype: str | None = None  # "bfloat16" / "float16" / "float32" for family "cast"
    ggml: GgmlLayout | None = None  # family "ggml" only

    def __post_init__(self):
        if self.family not in ("mx", "absmax", "nvfp4", "ggml", "cast"):
            raise ValueError(
                f"format {self.name!r}: family must be mx, absmax, nvfp4, ggml or cast, got {self.family!r}"
            )
        if (self.family == "ggml") != (self.ggml is not None):
            raise ValueError(f"format {self.name!r}: a GgmlLayout goes with family 'ggml' and only with it")
        if self.ggml is not None:
            self.ggml.check(self.element.bits)
            if self.block_size != self.ggml.super_block:
                raise ValueError(f"format {self.name!r}: llama.cpp blocks hold {self.ggml.super_block} elements")
        if self.family == "cast":
            if self.cast_dtype not in ("bfloat16", "float16", "float32") or self.element is not None:
                raise ValueError(
                    f"format {self.name!r}: a cast needs cast_dtype bfloat16/float16/float32 and no element"
                )
            if self.block_size is not None:
                raise ValueError(f"format {self.name!r}: a cast has no block size")
        else:
            if self.element is None:
                raise ValueError(f"format {self.name!r}: a scaled format needs an element type")
            validate_block_size(self.block_size, what=f"format {self.name!r}")
        if not isinstance(self.axis, int):
            raise TypeError(f"format {self.name!r}: axis must be an int, got {type(self.axis).__name__}")

    @property
    def element_bits(self) -> int:
        if self.family == "cast":
            return {"bfloat16": 16, "float16": 16, "float32": 32}[self.cast_dtype]
        return self.element.bits

    @property
    def bits_per_element(self) -> float:
        """Element bits plus the block scale's bits spread over the block (MXFP4 at 32: 4.25).

        For "vector" and "tensor" blocks the overhead depends on the tensor's shape and is
        left out here; ``storage_bits(shape)`` counts it exactly."""
        if self.family == "ggml":
            return 8 * self.ggml.block_bytes / self.ggml.super_block
        if isinstance(self.block_size, int):
            return self.element_bits + self.scale.bits / self.block_size
        return float(self.element_bits)

    @property
    def is_low_precision(self) -> bool:
        """Narrower than 16 bits: what counts toward the quantization ratio Q_r."""
        return self.element_bits < 16

    def with_block(self, block_size: BlockSize | None) -> Format:
        """The same format with another block size (None keeps the default)."""
        if block_size is None or block_size == self.block_size:
            return self
        if self.family == "cast":
            raise ValueError(f"format {self.name!r} is a plain cast and takes no block size")
        if self.family == "nvfp4" and block_size == "tensor":
            raise ValueError("nvfp4 already has a tensor scale; its block size must be an int or 'vector'")
        if self.family == "ggml":
            raise ValueError(
                f"format {self.name!r} is llama.cpp's {self.ggml.type_name}, whose blocks hold "
                f"{self.block_size} elements; it takes no other block size (got {block_size!r})"
            )
        return dataclasses.replace(self, block_size=block_size)

    def storage_bits(self, shape, axis: int | None = None) -> int:
        """Exact bits to store a tensor of ``shape``: codes, block scales and tensor scale."""
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        if self.family == "cast":
            return numel * self.element_bits
        if self.family == "ggml":
            return self.n_blocks(shape, axis) * 8 * self.ggml.block_bytes
        tensor_scale_bits = 32 if self.family == "nvfp4" else 0
        return numel * self.element.bits + self.n_blocks(shape, axis) * self.scale.bits + tensor_scale_bits

    def n_blocks(self, shape, axis: int | None = None) -> int:
        """Shared scales of a tensor of ``shape`` blocked along ``axis`` (0 for a plain cast):
        one per tensor, per vector along the axis, or per started block of it."""
        shape = tuple(int(s) for s in shape)
        if self.family == "cast":
            return 0
        numel = math.prod(shape)
        length = shape[self.axis if axis is None else axis] if shape else 1
        if self.block_size == "tensor":
            return 1
        if self.block_size == "vector":
            return numel // max(length, 1)
        return (numel // max(length, 1)) * math.ceil(length / self.block_size)


def validate_block_size(block_size, what: str = "block_size") -> None:
    if isinstance(block_size, str):
        if block_size not in BLOCK_KINDS:
            raise ValueError(f"{what}: block size must be a positive int, 'vector' or 'tensor', got {block_size!r}")
        return
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"{what}: block size must be a positive int, 'vector' or 'tensor', got {block_size!r}")


def parse_block_size(text: str | None):
    """A block size as a command line or a table writes it: an int, 'vector' or 'tensor';
    'default', '' or None give None (the format's own block size)."""
    if text is None or text in ("", "default"):
        return None
    if text in BLOCK_KINDS:
        return text
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"block size must be a positive int, 'vector', 'tensor' or 'default', got {text!r}") from None
    validate_block_size(value)
    return value


# ---- element types -----------------------------------------------------------------------
E2M1 = ElementType("e2m1", "float", 4, exp_bits=2, man_bits=1, bias=1)
E2M3 = ElementType("e2m3", "float", 6, exp_bits=2, man_bits=3, bias=1)
E3M2 = ElementType("e3m2", "float", 6, exp_bits=3, man_bits=2, bias=3)
E4M3 = ElementType("e4m3", "float", 8, exp_bits=4, man_bits=3, bias=7, special="fn")
E5M2 = ElementType("e5m2", "float", 8, exp_bits=5, man_bits=2, bias=15, special="ieee")
MXINT8_ELEMENT = ElementType("int8_fixed", "int", 8, frac_bits=6)  # k/64, |k| <= 127
MXINT4_ELEMENT = ElementType("int4_fixed", "int", 4, frac_bits=2)  # k/4, |k| <= 7
INT8 = ElementType("int8", "int", 8)
INT7 = ElementType("int7", "int", 7)
INT6 = ElementType("int6", "int", 6)
INT5 = ElementType("int5", "int", 5)
INT4 = ElementType("int4", "int", 4)
INT3 = ElementType("int3", "int", 3)
# llama.cpp's codes: Q4_0 -8..7, Q5_0 -16..15, Q6_K -32..31 (two's complement, full range);
# Q8_0 and Q8_K -127..127 (INT8 above); the formats with a minimum store unsigned codes.
INT4_FULL = ElementType("int4_full", "int", 4, full_range=True)
INT5_FULL = ElementType("int5_full", "int", 5, full_range=True)
INT6_FULL = ElementType("int6_full", "int", 6, full_range=True)
UINT4 = ElementType("uint4", "uint", 4)
UINT5 = ElementType("uint5", "uint", 5)

E8M0 = ScaleType("e8m0", 8)
FP16_SCALE = ScaleType("fp16", 16)
E4M3_SCALE = ScaleType("e4m3", 8)
FP32_SCALE = ScaleType("fp32", 32)
NO_SCALE = ScaleType("none", 0)

# ---- presets -----------------------------------------------------------------------------
MX_BLOCK = 32
QK_K = 256


def _ggml(name, element, layout: GgmlLayout) -> Format:
    return Format(
        name, "ggml", element, FP16_SCALE if layout.type_name != "Q8_K" else FP32_SCALE, layout.super_block, ggml=layout
    )


# llama.cpp's block types (ggml-common.h). Bits per weight include every scale and minimum:
# q8_0 8.5, q4_0 4.5, q4_1 5, q5_0 5.5, q5_1 6, q4_k 4.5, q5_k 5.5, q6_k 6.5625. q8_k is what
# llama.cpp's CPU kernels turn activations into for k-quant weights (an fp32 scale per 256 and
# sums of 16 codes); it is a format for activations, not for GGUF files.
_GGML_PRESETS = [
    _ggml("q8_0", INT8, GgmlLayout("Q8_0", 32, 32, 16, 0, False, 34)),
    _ggml("q4_0", INT4_FULL, GgmlLayout("Q4_0", 32, 32, 16, 0, False, 18)),
    _ggml("q4_1", UINT4, GgmlLayout("Q4_1", 32, 32, 16, 0, True, 20)),
    _ggml("q5_0", INT5_FULL, GgmlLayout("Q5_0", 32, 32, 16, 0, False, 22)),
    _ggml("q5_1", UINT5, GgmlLayout("Q5_1", 32, 32, 16, 0, True, 24)),
    _ggml("q4_k", UINT4, GgmlLayout("Q4_K", QK_K, 32, 6, 16, True, 144)),
    _ggml("q5_k", UINT5, GgmlLayout("Q5_K", QK_K, 32, 6, 16, True, 176)),
    _ggml("q6_k", INT6_FULL, GgmlLayout("Q6_K", QK_K, 16, 8, 16, False, 210)),
    _ggml("q8_k", INT8, GgmlLayout("Q8_K", QK_K, QK_K, 0, 32, False, 292, extra_bits=16 * 16)),
]
_PRESETS = [
    Format("mxint8", "mx", MXINT8_ELEMENT, E8M0, MX_BLOCK),
    Format("mxint4", "mx", MXINT4_ELEMENT, E8M0, MX_BLOCK),
    Format("mxfp8_e4m3", "mx", E4M3, E8M0, MX_BLOCK),
    Format("mxfp8_e5m2", "mx", E5M2, E8M0, MX_BLOCK),
    Format("mxfp6_e2m3", "mx", E2M3, E8M0, MX_BLOCK),
    Format("mxfp6_e3m2", "mx", E3M2, E8M0, MX_BLOCK),
    Format("mxfp4", "mx", E2M1, E8M0, MX_BLOCK),
    Format("nvfp4", "nvfp4", E2M1, E4M3_SCALE, 16),
    # FP4-E2M1 with a float scale per output channel (along the reduction axis) by default;
    # block_size="tensor" gives the per-tensor variant.
    Format("fp4_e2m1", "absmax", E2M1, FP32_SCALE, "vector"),
    # Symmetric integer formats with an fp32 scale per group (the k-bit scaling study's blocks:
    # Dettmers & Zettlemoyer sweep k = 3..8).
    Format("int8", "absmax", INT8, FP32_SCALE, 128),
    Format("int7", "absmax", INT7, FP32_SCALE, 128),
    Format("int6", "absmax", INT6, FP32_SCALE, 128),
    Format("int5", "absmax", INT5, FP32_SCALE, 128),
    Format("int4", "absmax", INT4, FP32_SCALE, 128),
    Format("int3", "absmax", INT3, FP32_SCALE, 128),
    *_GGML_PRESETS,
    Format("bf16", "cast", None, NO_SCALE, None, cast_dtype="bfloat16"),
    Format("fp16", "cast", None, NO_SCALE, None, cast_dtype="float16"),
    Format("fp32", "cast", None, NO_SCALE, None, cast_dtype="float32"),
]
FORMATS: dict[str, Format] = {f.name: f for f in _PRESETS}


def get_format(fmt: str | Format) -> Format:
    """The preset named ``fmt`` (a ``Format`` passes through). Unknown names raise ValueError."""
    if isinstance(fmt, Format):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(f"a format is a name or a mpqc.formats.Format, got {type(fmt).__name__}")
    key = fmt.lower()
    if key not in FORMATS:
        close = difflib.get_close_matches(key, FORMATS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown format {fmt!r}{hint}; valid formats: {', '.join(FORMATS)}")
    return FORMATS[key]
