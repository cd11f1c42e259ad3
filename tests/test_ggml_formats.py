"""llama.cpp's block types: bit for bit against ggml's own reference quantizers and gguf.quants.

The oracle is ggml itself: the ``quantize_row_*_ref`` functions that llama-quantize runs (without
an importance matrix), called through ctypes inside the xllamacpp wheel (the ``llamacpp`` and
``test`` extras). ``gguf.quants`` (pure numpy) is the second oracle where it implements a type:
quantization of the legacy types, dequantization of all.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

import mpqc
from mpqc.formats import ggml
from mpqc.formats.packing import GGUF_STORABLE, to_ggml_blocks

gguf = pytest.importorskip("gguf")

TYPES = {  # mpqc name -> (GGML type, block, bytes per block)
    "q8_0": ("Q8_0", 32, 34),
    "q4_0": ("Q4_0", 32, 18),
    "q4_1": ("Q4_1", 32, 20),
    "q5_0": ("Q5_0", 32, 22),
    "q5_1": ("Q5_1", 32, 24),
    "q4_k": ("Q4_K", 256, 144),
    "q5_k": ("Q5_K", 256, 176),
    "q6_k": ("Q6_K", 256, 210),
    "q8_k": ("Q8_K", 256, 292),
}
LEGACY = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


@pytest.fixture(scope="module")
def ggml_lib():
    xllamacpp = pytest.importorskip("xllamacpp")
    return ctypes.CDLL(xllamacpp.xllamacpp.__file__)


def ggml_reference(lib, type_name: str, x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_<type>_ref on x (rows of whole blocks): (blocks, bytes) uint8."""
    block, nbytes = next((b, n) for t, b, n in TYPES.values() if t == type_name)
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros(x.size // block * nbytes, dtype=np.uint8)
    fn = getattr(lib, f"quantize_row_{type_name[:-1].lower()}{type_name[-1]}_ref")
    fn(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
    return out.reshape(-1, nbytes)


def mpqc_bytes(name: str, x: np.ndarray) -> np.ndarray:
    type_name, block, _ = TYPES[name]
    return ggml.to_bytes(ggml.ENCODERS[type_name](torch.from_numpy(x).reshape(-1, block))).numpy()


def inputs(block: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(18)
    n = 4 * 1024
    grid = rng.integers(-16, 17, n).astype(np.float32) * 0.125  # many exact ties of every type's grid
    halves = (rng.integers(-40, 40, n) + 0.5).astype(np.float32) / 8  # midpoints
    const = np.repeat(rng.standard_normal(n // block).astype(np.float32), block)
    sparse = rng.standard_normal(n).astype(np.float32) * (rng.random(n) < 0.05)
    return {
        "normal": rng.standard_normal(n).astype(np.float32),
        "heavy_tailed": (rng.standard_t(1.5, n) * 0.02).astype(np.float32),
        "lognormal_positive": np.exp(rng.standard_normal(n) * 2).astype(np.float32),
        "ties": grid,
        "midpoints": halves,
        "zeros": np.zeros(n, np.float32),
        "constant_blocks": const,
        "sparse": sparse,
        "tiny": (rng.standard_normal(n) * 1e-6).astype(np.float32),  # fp16 subnormal scales
        "huge": (rng.standard_normal(n) * 1e6).astype(np.float32),  # fp16 scales overflow
    }


@pytest.mark.parametrize("name", list(TYPES))
def test_bit_exact_against_ggml_reference(ggml_lib, name):
    type_name, block, _ = TYPES[name]
    for label, x in inputs(block).items():
        ref = ggml_reference(ggml_lib, type_name, x)
        got = mpqc_bytes(name, x)
        bad = np.flatnonzero(~(got == ref).all(axis=1))
        assert bad.size == 0, f"{name} on {label}: {bad.size} of {len(ref)} blocks differ from ggml (first {bad[0]})"


@pytest.mark.parametrize("name", LEGACY)
def test_quantize_equals_gguf_quants(name):
    type_name, block, _ = TYPES[name]
    qtype = gguf.GGMLQuantizationType[type_name]
    for label, x in inputs(block).items():
        if label == "huge":  # gguf.quants casts an Inf scale's NaN codes to int8: undefined there
            continue
        # gguf.quants picks a block's first element as its max when all are zero, so a block of
        # -0.0 and +0.0 gets a scale of +0.0 there and -0.0 in ggml: compare on +0.0 only
        x = x + 0.0
        ref = gguf.quants.quantize(x.reshape(-1, block), qtype).reshape(-1, TYPES[name][2])
        assert np.array_equal(mpqc_bytes(name, x), ref), f"{name} on {label}"


@pytest.mark.parametrize("name", [n for n in TYPES if n != "q8_k"])
def test_decode_equals_gguf_dequantize_and_quantize(name):
    """mpqc's quantize() is what gguf's reader gets back from the bytes, bit for bit."""
    type_name, block, _ = TYPES[name]
    x = inputs(block)["heavy_tailed"].reshape(8, -1)
    data = mpqc_bytes(name, x)
    deq = gguf.quants.dequantize(data.reshape(-1), gguf.GGMLQuantizationType[type_name]).reshape(x.shape)
    q = mpqc.formats.quantize(torch.from_numpy(x), name).numpy()
    assert np.array_equal(deq.view(np.uint32), q.view(np.uint32))
    packed = mpqc.formats.pack(torch.from_numpy(x), name)
    assert packed.nbytes == data.nbytes
    assert torch.equal(packed.unpack(), torch.from_numpy(q))
    assert np.array_equal(ggml.to_bytes(ggml.from_bytes(type_name, torch.from_numpy(data))).numpy(), data)


@pytest.mark.parametrize("name", list(TYPES))
def test_non_finite_blocks_are_nan_and_others_untouched(name):
    type_name, block, _ = TYPES[name]
    x = torch.randn(4, 2 * block)
    x[0, 3] = float("nan")
    x[1, block + 5] = float("inf")
    x[2, 0] = -float("inf")
    q = mpqc.formats.quantize(x, name)
    assert torch.isnan(q[0, :block]).all() and torch.isnan(q[1, block:]).all() and torch.isnan(q[2, :block]).all()
    finite = torch.isfinite(x).all(dim=1)
    assert torch.equal(q[3], mpqc.formats.quantize(x[3:4], name)[0]) and finite[3]
    assert torch.equal(q[0, block:], mpqc.formats.quantize(x[0:1, block:], name)[0])
    if name in LEGACY:  # gguf.quants gives no finite value in such a block either
        with np.errstate(all="ignore"):
            rt = gguf.quants.quantize(x[:3].numpy().reshape(-1, block), gguf.GGMLQuantizationType[type_name])
            deq = gguf.quants.dequantize(rt.reshape(-1), gguf.GGMLQuantizationType[type_name]).reshape(3, -1)
        assert not np.isfinite(deq[0, :block]).any() and not np.isfinite(deq[1, block:]).any()


def test_descriptions_and_true_bits_per_weight():
    expected = {"q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q4_k": 4.5, "q5_k": 5.5}
    for name, bits in expected.items():
        fmt = mpqc.formats.get_format(name)
        assert fmt.bits_per_element == bits and fmt.family == "ggml" and fmt.is_low_precision
    assert mpqc.formats.get_format("q6_k").bits_per_element == 6.5625
    fmt = mpqc.formats.get_format("q4_k")
    assert fmt.storage_bits((576, 1536), axis=-1) == 576 * 6 * 144 * 8
    assert set(GGUF_STORABLE) == {*TYPES} - {"q8_k"} | {"mxfp4", "mxint8", "mxint4"}


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="blocks of 256"):
        mpqc.formats.quantize(torch.randn(4, 576), "q4_k")
    with pytest.raises(ValueError, match="rounding"):
        mpqc.formats.quantize(torch.randn(4, 64), "q4_0", rounding="even")
    with pytest.raises(ValueError, match="no other block size"):
        mpqc.formats.quantize(torch.randn(4, 64), "q8_0", block_size=64)
    with pytest.raises(ValueError, match="no exact GGUF type"):
        to_ggml_blocks(torch.randn(4, 64), mpqc.formats.get_format("int4"))


@pytest.mark.parametrize("name", ["mxfp4", "mxint8", "mxint4"])
def test_mx_formats_in_their_exact_gguf_containers(name):
    x = torch.randn(16, 256) * torch.logspace(-3, 2, 16)[:, None]
    x[0, :32] = 0  # an all-zero block
    blocks = to_ggml_blocks(x, mpqc.formats.get_format(name))
    data = ggml.to_bytes(blocks).numpy().reshape(-1)
    deq = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[blocks.type_name]).reshape(x.shape)
    assert np.array_equal(deq, mpqc.formats.quantize(x, name).numpy())


def test_mxint_scale_outside_fp16_is_refused():
    with pytest.raises(ValueError, match="outside fp16"):
        to_ggml_blocks(torch.full((1, 32), 1e-9), mpqc.formats.get_format("mxint8"))


def test_q4_0_lower_error_than_symmetric_int4():
    """Q4_0's scale = max / -8 uses the code -8: lower error than absmax / 7 on Gaussian weights."""
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    q4_0 = (mpqc.formats.quantize(w, "q4_0") - w).pow(2).mean()
    int4 = (mpqc.formats.quantize(w, "int4", block_size=32) - w).pow(2).mean()
    assert q4_0 < int4
