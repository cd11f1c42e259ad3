"""An independent scalar oracle for the format definitions, in plain Python floats.

Written from the definitions in the formats issue and the OCP MX v1.0 spec, not from
mpqc's implementation: float64 holds every fp32 value and every power-of-two scaling of
one exactly, so the MX arithmetic below is exact. The absmax and NVFP4 scales are
computed in float32 with numpy (and E4M3 rounding with ml_dtypes), as the formats define.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class Elem:
    int_kind: bool
    bits: int
    man_bits: int = 0
    bias: int = 0
    frac_bits: int = 0
    max_normal: float = 0.0

    @property
    def emin(self):
        return 1 - self.bias

    @property
    def emax(self):
        return math.floor(math.log2(self.max_normal))


ELEMS = {
    "mxint8": Elem(True, 8, frac_bits=6, max_normal=127 / 64),
    "mxint4": Elem(True, 4, frac_bits=2, max_normal=7 / 4),
    "mxfp8_e4m3": Elem(False, 8, man_bits=3, bias=7, max_normal=448.0),
    "mxfp8_e5m2": Elem(False, 8, man_bits=2, bias=15, max_normal=57344.0),
    "mxfp6_e2m3": Elem(False, 6, man_bits=3, bias=1, max_normal=7.5),
    "mxfp6_e3m2": Elem(False, 6, man_bits=2, bias=3, max_normal=28.0),
    "mxfp4": Elem(False, 4, man_bits=1, bias=1, max_normal=6.0),
    "nvfp4": Elem(False, 4, man_bits=1, bias=1, max_normal=6.0),
    "fp4_e2m1": Elem(False, 4, man_bits=1, bias=1, max_normal=6.0),
    "int8": Elem(True, 8, max_normal=127.0),
    "int7": Elem(True, 7, max_normal=63.0),
    "int6": Elem(True, 6, max_normal=31.0),
    "int5": Elem(True, 5, max_normal=15.0),
    "int4": Elem(True, 4, max_normal=7.0),
    "int3": Elem(True, 3, max_normal=3.0),
}


def round_half(r: float, rounding: str) -> float:
    """r >= 0; 'nearest' ties away from zero, 'even' ties to even."""
    lo = math.floor(r)
    frac = r - lo
    if frac > 0.5 or (frac == 0.5 and (rounding == "nearest" or lo % 2 == 1)):
        return lo + 1.0
    return float(lo)


def element(v: float, e: Elem, rounding: str) -> float:
    """Round a scaled value onto the element grid, saturating."""
    a = abs(v)
    if e.int_kind:
        unit = 2.0**e.frac_bits
        q = min(round_half(a * unit, rounding), 2 ** (e.bits - 1) - 1) / unit
    else:
        exp = max(math.frexp(a)[1] - 1, e.emin) if a > 0 else e.emin
        step = 2.0 ** (exp - e.man_bits)
        q = min(round_half(a / step, rounding) * step, e.max_normal)
    return math.copysign(q, v)


def mx_block(values, fmt: str, rounding: str = "nearest"):
    e = ELEMS[fmt]
    if any(not math.isfinite(v) for v in values):
        return [math.nan] * len(values)
    amax = max(abs(v) for v in values)
    top = math.frexp(amax)[1] - 1 if amax > 0 else -126
    shared = max(min(top - e.emax, 127), -127)
    scale = 2.0**shared
    return [element(v / scale, e, rounding) * scale for v in values]


def absmax_block(values, fmt: str, rounding: str = "nearest"):
    e = ELEMS[fmt]
    if any(not math.isfinite(v) for v in values):
        return [math.nan] * len(values)
    f32 = np.float32
    scale = f32(max(abs(f32(v)) for v in values)) / f32(e.max_normal)
    safe = scale if scale != 0 else f32(1.0)
    return [float(f32(element(float(f32(v) / safe), e, rounding)) * scale) for v in values]


def nvfp4_tensor(values, rounding: str = "nearest", block: int = 16):
    """NVFP4 over a 1-D list: fp32 tensor scale amax/(6*448), E4M3 scale per block of 16."""
    f32 = np.float32
    values = [f32(v) for v in values]
    tscale = f32(max(abs(v) for v in values)) / f32(6.0 * 448.0)
    tscale = tscale if tscale != 0 else f32(1.0)
    out = []
    for i in range(0, len(values), block):
        blk = values[i : i + block]
        wanted = min(f32(max(abs(v) for v in blk)) / (f32(6.0) * tscale), f32(448.0))
        bscale = f32(np.asarray(wanted, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
        s = f32(bscale * tscale)
        safe = s if s != 0 else f32(1.0)
        out += [float(f32(element(float(v / safe), ELEMS["nvfp4"], rounding)) * s) for v in blk]
    return out
