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
    """

    name: str
    kind: str
    bits: int
    exp_bits: int = 0
    man_bits: int = 0
    bias: int = 0
    special: str = "none"
    frac_bits: int = 0

    def __post_init__(self):
        if self.kind not in ("float", "int"):
            raise ValueError(f"element {self.name!r}: kind must be 'float' or 'int', got {self.kind!r}")
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
        """Largest integer magnitude of an int element."""
        return 2 ** (self.bits - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value (floats); subnormals share it."""
        return 1 - self.bias

    @property
    def max_normal(self) -> float:
        if self.kind == "int":
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
        return 2.0**-self.frac_bits if self.kind == "int" else 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0**-self.frac_bits if self.kind == "int" else 2.0 ** (self.emin - self.man_bits)

    @property
    def emax(self) -> int:
        """floor(log2(max_normal)): what the OCP MX shared exponent is offset by."""
        return math.floor(math.log2(self.max_normal))

    def decode(self, code: int) -> float:
        """The value a code stands for (NaN/Inf for the special codes)."""
        if not 0 <= code < 2**self.bits:
            raise ValueError(f"element {self.name!r}: code {code} out of range [0, {2**self.bits})")
        if self.kind == "int":
            k = code - 2**self.bits if code >= 2 ** (self.bits - 1) else code
            if k == -(2 ** (self.bits - 1)):
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
    "fp32" (a float32 absmax scale), or "none" (plain casts)."""

    name: str
    bits: int

    def __post_init__(self):
        if self.name not in ("e8m0", "e4m3", "fp32", "none"):
            raise ValueError(f"scale type must be e8m0, e4m3, fp32 or none, got {self.name!r}")


@dataclass(frozen=True)
class Format:
    """A number format: elements, how blocks of them are scaled, the default block and axis.

    ``family`` picks the arithmetic: "mx" (shared E8M0 exponent, OCP MX v1.0), "absmax"
    (float scale = block absmax / element max), "nvfp4" (E4M3 block scale under an fp32
    tensor scale), or "cast" (a plain IEEE cast to ``cast_dtype``).
    """

    name: str
    family: str
    element: ElementType | None
    scale: ScaleType
    block_size: BlockSize | None
    axis: int = -1
    cast_dtype: str | None = None  # "bfloat16" / "float16" / "float32" for family "cast"

    def __post_init__(self):
        if self.family not in ("mx", "absmax", "nvfp4", "cast"):
            raise ValueError(f"format {self.name!r}: family must be mx, absmax, nvfp4 or cast, got {self.family!r}")
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
        return dataclasses.replace(self, block_size=block_size)

    def storage_bits(self, shape, axis: int | None = None) -> int:
        """Exact bits to store a tensor of ``shape``: codes, block scales and tensor scale."""
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        if self.family == "cast":
            return numel * self.element_bits
        axis = self.axis if axis is None else axis
        length = shape[axis] if shape else 1
        if self.block_size == "tensor":
            n_blocks = 1
        elif self.block_size == "vector":
            n_blocks = numel // max(length, 1)
        else:
            n_blocks = (numel // max(length, 1)) * math.ceil(length / self.block_size)
        tensor_scale_bits = 32 if self.family == "nvfp4" else 0
        return numel * self.element.bits + n_blocks * self.scale.bits + tensor_scale_bits


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
INT4 = ElementType("int4", "int", 4)

E8M0 = ScaleType("e8m0", 8)
E4M3_SCALE = ScaleType("e4m3", 8)
FP32_SCALE = ScaleType("fp32", 32)
NO_SCALE = ScaleType("none", 0)

# ---- presets -----------------------------------------------------------------------------
MX_BLOCK = 32
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
    # Symmetric integer formats with an fp32 scale per group (the k-bit scaling study's blocks).
    Format("int8", "absmax", INT8, FP32_SCALE, 128),
    Format("int4", "absmax", INT4, FP32_SCALE, 128),
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
