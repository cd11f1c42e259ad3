"""mpqc.formats: exact values from the definitions, checked against hand lists and the oracle."""

from __future__ import annotations

import math

import formats_oracle as oracle
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpqc import formats
from mpqc.formats import get_format, pack, quantize

MX = ["mxint8", "mxint4", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4"]
INTS = ["int8", "int7", "int6", "int5", "int4", "int3"]  # absmax, fp32 scale per 128: the k-bit study's
SCALED = MX + ["nvfp4", "fp4_e2m1", *INTS]
ALL = SCALED + ["bf16", "fp16", "fp32"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that NaN == NaN and -0 != +0 in comparisons."""
    return t.contiguous().view(
        {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype]
    )


def assert_same(actual: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), (actual, expected)
    assert torch.equal(actual[~nan], expected[~nan]), (actual, expected)


# ---- format descriptions ------------------------------------------------------------------


def test_descriptions():
    assert get_format("mxfp4").bits_per_element == 4.25
    assert get_format("mxint8").bits_per_element == 8.25
    assert get_format("mxfp4").with_block(16).bits_per_element == 4.5
    assert get_format("nvfp4").bits_per_element == 4.5
    assert get_format("int4").bits_per_element == 4 + 32 / 128
    assert get_format("bf16").bits_per_element == 16
    e = get_format("mxfp8_e4m3").element
    assert (e.max_normal, e.min_normal, e.min_subnormal, e.emax) == (448.0, 2.0**-6, 2.0**-9, 8)
    e = get_format("mxfp8_e5m2").element
    assert (e.max_normal, e.min_normal, e.min_subnormal, e.emax) == (57344.0, 2.0**-14, 2.0**-16, 15)
    assert get_format("mxfp6_e2m3").element.max_normal == 7.5
    assert get_format("mxfp6_e3m2").element.max_normal == 28.0
    assert get_format("mxint4").element.max_normal == 1.75
    assert get_format("mxint8").element.max_normal == 127 / 64
    # exact storage: 4096 x 4096 MXFP4 at block 32 = 4 bits per element + one byte per 32
    assert get_format("mxfp4").storage_bits((4096, 4096)) == 4096 * 4096 * 4 + 4096 * 128 * 8
    assert get_format("fp4_e2m1").storage_bits((10, 64), axis=1) == 640 * 4 + 10 * 32
    with pytest.raises(Exception):  # noqa: B017 - whatever a frozen dataclass raises
        get_format("mxfp4").block_size = 16  # frozen


def test_special_codes():
    e4m3 = get_format("mxfp8_e4m3").element
    assert math.isnan(e4m3.decode(0x7F)) and math.isnan(e4m3.decode(0xFF))
    assert e4m3.decode(0x7E) == 448.0 and e4m3.decode(0x01) == 2.0**-9
    e5m2 = get_format("mxfp8_e5m2").element
    assert e5m2.decode(0x7C) == math.inf and e5m2.decode(0xFC) == -math.inf and math.isnan(e5m2.decode(0x7D))
    assert e5m2.decode(0x7B) == 57344.0
    assert get_format("mxint4").element.decode(0b1001) == -7 / 4  # two's complement


# ---- value grids and code round trips ----------------------------------------------------

FP4_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_mxfp4_full_grid():
    grid = FP4_GRID + [-v for v in FP4_GRID[1:]]
    x = torch.tensor(grid)  # max 6: shared exponent 2 - emax 2 = 0, scale 1
    assert_same(quantize(x, "mxfp4"), grid)
    table = formats.code_table(get_format("mxfp4").element)
    assert table.tolist()[:8] == FP4_GRID and table.tolist()[8:] == [-v for v in FP4_GRID]


def test_mxint4_full_grid():
    grid = [k / 4 for k in range(-7, 8)]
    x = torch.tensor(grid)  # max 1.75: floor(log2) = 0, scale 1
    assert_same(quantize(x, "mxint4"), grid)
    table = formats.code_table(get_format("mxint4").element).tolist()
    assert (
        table[:8] == [k / 4 for k in range(8)] and math.isnan(table[8]) and table[9:] == [k / 4 for k in range(-7, 0)]
    )
    packed = pack(x, "mxint4")
    assert torch.equal(packed.unpack(), quantize(x, "mxint4"))


def test_int3_to_int8_grids_by_hand():
    # absmax with an fp32 scale max|x| / (2**(k-1) - 1): a block whose max is qmax has scale 1.
    assert [get_format(f"int{k}").element.qmax for k in range(3, 9)] == [3, 7, 15, 31, 63, 127]
    assert [get_format(f"int{k}").bits_per_element for k in range(3, 9)] == [k + 32 / 128 for k in range(3, 9)]
    assert_same(quantize(torch.tensor([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0]), "int3"), [-3, -2, -1, 0, 1, 2, 3])
    # 1.4 -> 1; 0.5 and -2.5 are ties: away from zero ("nearest") or to even
    x = torch.tensor([3.0, 1.4, 0.5, -2.5])
    assert quantize(x, "int3").tolist() == [3.0, 1.0, 1.0, -3.0]
    assert quantize(x, "int3", rounding="even").tolist() == [3.0, 1.0, 0.0, -2.0]
    # int5 at block 2: each pair scaled by its own max / 15
    assert quantize(torch.tensor([15.0, 7.4, 30.0, 1.0]), "int5", block_size=2).tolist() == [15.0, 7.0, 30.0, 2.0]
    assert torch.equal(pack(x, "int3").unpack(), quantize(x, "int3"))


@pytest.mark.parametrize("name", SCALED)
def test_every_code_round_trips(name):
    """Each finite code's value, placed in a block that fixes the scale, comes back with its own code."""
    fmt = get_format(name)
    table = formats.code_table(fmt.element)
    finite = torch.isfinite(table)
    values = table[finite]
    codes = torch.arange(len(table))[finite]
    if fmt.family == "mx":
        # The grid's max normal is in every block, so the shared exponent is emax - emax = 0.
        x = torch.stack([values, torch.full_like(values, fmt.element.max_normal)], dim=1)
        packed = pack(x, fmt, block_size=2)
        q = quantize(x, fmt, block_size=2)
        assert torch.equal(bits(q[:, 0]), bits(values))
        assert torch.equal(packed.unpack(), q)
        assert packed.scales.eq(127).all()  # E8M0 code of 2**0
        element_codes = formats.packing.unpack_bits(packed.codes, fmt.element.bits, x.numel()).reshape(-1, 2)[:, 0]
        assert torch.equal(element_codes, codes)
    else:
        got = formats.packing.element_codes(values, fmt.element)
        assert torch.equal(got.long(), codes)
        assert torch.equal(bits(table[got.long()]), bits(values))


# ---- rounding, saturation, specials -------------------------------------------------------


@pytest.mark.parametrize(
    "value,nearest,even",
    [
        (0.25, 0.5, 0.0),
        (0.75, 1.0, 1.0),
        (1.25, 1.5, 1.0),
        (1.75, 2.0, 2.0),
        (2.5, 3.0, 2.0),
        (3.5, 4.0, 4.0),
        (5.0, 6.0, 4.0),
    ],
)
def test_mxfp4_ties(value, nearest, even):
    x = torch.tensor([value, -value, 6.0])  # 6 fixes the scale at 1
    assert quantize(x, "mxfp4").tolist() == [nearest, -nearest, 6.0]
    assert quantize(x, "mxfp4", rounding="even").tolist() == [even, -even, 6.0]


@pytest.mark.parametrize(
    "value,nearest,even", [(0.125, 0.25, 0.0), (0.375, 0.5, 0.5), (0.625, 0.75, 0.5), (1.625, 1.75, 1.5)]
)
def test_mxint4_ties(value, nearest, even):
    x = torch.tensor([value, -value, 1.75])
    assert quantize(x, "mxint4").tolist() == [nearest, -nearest, 1.75]
    assert quantize(x, "mxint4", rounding="even").tolist() == [even, -even, 1.75]


def test_saturation():
    # Block max in (6, 8): floor(log2) = 2, scale 2**0, so the max saturates to 6.
    assert quantize(torch.tensor([7.0, 1.0, -7.9]), "mxfp4").tolist() == [6.0, 1.0, -6.0]
    # MXINT4 with max 1.9 (scale 1): 1.9 * 4 = 7.6 rounds to 8, saturates to 7 -> 1.75.
    assert quantize(torch.tensor([1.9, -1.9, 0.5]), "mxint4").tolist() == [1.75, -1.75, 0.5]
    # MXINT8: 1.999 -> k = 128 saturates to 127, never -128.
    assert quantize(torch.tensor([1.999, -1.999]), "mxint8").tolist() == [127 / 64, -127 / 64]


@pytest.mark.parametrize("name", MX + [*INTS, "fp4_e2m1"])
def test_nan_inf_and_zero_blocks(name):
    x = torch.tensor(
        [[1.0, 2.0, math.nan, 0.5], [1.0, math.inf, 3.0, 0.5], [0.0, -0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 0.5]]
    )
    q = quantize(x, name, block_size=4 if name != "fp4_e2m1" else "vector")
    assert torch.isnan(q[0]).all() and torch.isnan(q[1]).all()
    assert q[2].eq(0).all()
    assert not torch.isnan(q[3]).any()
    assert torch.equal(pack(x, name, block_size=4 if name != "fp4_e2m1" else "vector").unpack().isnan(), q.isnan())


def test_ragged_tail_behaves_as_zero_padded():
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    q = quantize(x, "mxfp4", block_size=32)
    assert torch.equal(q[:, :32], quantize(x[:, :32], "mxfp4", block_size=32))
    assert torch.equal(q[:, 32:], quantize(x[:, 32:], "mxfp4", block_size=32))  # 8 alone == 8 + 24 zeros
    padded = torch.cat([x, torch.zeros(3, 24)], dim=1)
    assert torch.equal(q, quantize(padded, "mxfp4", block_size=32)[:, :40])


@pytest.mark.parametrize("name", SCALED)
def test_axis_other_than_last(name):
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    block = 16 if get_format(name).block_size not in ("vector", "tensor") else None
    assert torch.equal(
        quantize(x, name, axis=0, block_size=block), quantize(x.T.contiguous(), name, block_size=block).T
    )
    y = torch.randn(2, 32, 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(
        quantize(y, name, axis=1, block_size=block), quantize(y.transpose(1, 2), name, block_size=block).transpose(1, 2)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ALL)
def test_half_inputs(name, dtype):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    q = quantize(x, name)
    assert q.dtype == dtype and q.shape == x.shape
    assert torch.equal(bits(q), bits(quantize(x.float(), name).to(dtype)))


def test_scale_range_limits():
    # Near the top of fp32: max 1.5 * 2**127 -> shared exponent 127 - 2 = 125, exact.
    big = 1.5 * 2.0**127
    assert quantize(torch.tensor([big, -big / 3]), "mxfp4").tolist() == [big, -0.5 * 2.0**127]
    assert quantize(torch.tensor([1.9 * 2.0**127]), "mxint8").tolist() == [122 / 64 * 2.0**127]
    # fp32 subnormals: a block with max 2**-126 asks for exponent -134, clamped to -127.
    x = torch.tensor([2.0**-126, 2.0**-130, 2.0**-137, 2.0**-149])
    assert quantize(x, "mxfp8_e4m3").tolist() == [2.0**-126, 2.0**-130, 2.0**-136, 0.0]  # 2**-137 is a tie: away
    assert quantize(x, "mxfp8_e4m3", rounding="even").tolist() == [2.0**-126, 2.0**-130, 0.0, 0.0]
    # A block entirely of subnormals flushes to zero under MXINT8 (2**-140 / 2**-127 = 2**-13 < 1/128).
    assert quantize(torch.tensor([2.0**-140, -(2.0**-141)]), "mxint8").eq(0).all()


def test_nvfp4_two_level_scale():
    x = torch.tensor([float(i) for i in range(-16, 16)]) / 4  # two blocks of 16
    expected = oracle.nvfp4_tensor(x.tolist())
    assert_same(quantize(x, "nvfp4"), expected)
    packed = pack(x, "nvfp4")
    assert packed.tensor_scale.item() == (torch.tensor(4.0) / 2688).item()  # fp32 amax / (6 * 448)
    assert torch.equal(packed.unpack(), quantize(x, "nvfp4"))


def test_casts():
    x = torch.tensor([1.0 + 2.0**-10, 70000.0, 1e-8])
    assert quantize(x, "bf16").tolist() == x.bfloat16().float().tolist()
    assert quantize(x, "fp16").tolist() == [1.0 + 2.0**-10, math.inf, x.half().float()[2].item()]
    assert torch.equal(quantize(x, "fp32"), x)
    assert torch.equal(pack(x, "bf16").unpack(), quantize(x, "bf16"))


# ---- against the oracle -----------------------------------------------------------------------


def _random_blocks(seed: int, n_blocks: int, block: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mant = torch.randn(n_blocks, block, generator=g)
    exps = torch.randint(-30, 30, (n_blocks, 1), generator=g).float()
    x = mant * torch.exp2(exps)
    # Plant exact ties: multiples of a small power of two sit on half-steps of every grid.
    ties = torch.randint(-64, 64, (n_blocks, block), generator=g).float() / 8 * torch.exp2(exps)
    return torch.where(torch.rand(n_blocks, block, generator=g) < 0.3, ties, x)


@pytest.mark.parametrize("rounding", ["nearest", "even"])
@pytest.mark.parametrize("name", MX)
def test_mx_matches_oracle(name, rounding):
    x = _random_blocks(hash(name) % 1000, 64, 32)
    q = quantize(x, name, rounding=rounding)
    expected = [oracle.mx_block(row, name, rounding) for row in x.tolist()]
    assert_same(q, expected)


@pytest.mark.parametrize("rounding", ["nearest", "even"])
@pytest.mark.parametrize("name", [*INTS, "fp4_e2m1"])
def test_absmax_matches_oracle(name, rounding):
    x = _random_blocks(7, 16, 128)
    block = 128 if name != "fp4_e2m1" else "vector"
    q = quantize(x, name, block_size=block, rounding=rounding)
    assert_same(q, [oracle.absmax_block(row, name, rounding) for row in x.tolist()])


def test_nvfp4_matches_oracle():
    x = _random_blocks(11, 1, 256)[0] * 1e-3
    for rounding in ("nearest", "even"):
        assert_same(quantize(x, "nvfp4", rounding=rounding), oracle.nvfp4_tensor(x.tolist(), rounding))


# ---- property tests -------------------------------------------------------------------------

finite_f32 = st.floats(min_value=-(2.0**127), max_value=2.0**127, allow_nan=False, allow_infinity=False, width=32)
blocks_strategy = st.lists(finite_f32, min_size=1, max_size=70)


@settings(max_examples=60, deadline=None)
@given(values=blocks_strategy, name=st.sampled_from(SCALED), rounding=st.sampled_from(["nearest", "even"]))
def test_idempotent_symmetric_and_packs(values, name, rounding):
    x = torch.tensor(values, dtype=torch.float32)
    q = quantize(x, name, rounding=rounding)
    again = quantize(q, name, rounding=rounding)
    if name in MX:  # power-of-two scales: the dequantized values are exactly on the grid
        assert torch.equal(bits(again), bits(q))
    elif q.abs().max() >= 2.0**-100:
        # An fp32 scale (max|x| / element max) is recomputed from q's max, which its own
        # rounding moved by up to an ulp (x = 434647328 under NVFP4: q moves by one ulp).
        # Below 2**-100 NVFP4's tensor scale is subnormal and keeps fewer bits: no claim there.
        torch.testing.assert_close(again, q, rtol=2**-21, atol=0)
    assert torch.equal(quantize(-x, name, rounding=rounding), -q)
    assert torch.equal(bits(pack(x, name, rounding=rounding).unpack()), bits(q))


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, width=32), min_size=1, max_size=32
    ),
    name=st.sampled_from(MX),
)
def test_error_within_half_a_step(values, name):
    """Unsaturated elements are within half a grid step of the input; saturated ones clamp to the max."""
    x = torch.tensor(values, dtype=torch.float32)
    q = quantize(x, name).double()
    e = oracle.ELEMS[name]
    amax = x.abs().max().item()
    shared = max(min((math.frexp(amax)[1] - 1 if amax > 0 else -126) - e.emax, 127), -127)
    scale = 2.0**shared
    for xi, qi in zip(x.double().tolist(), q.tolist()):
        a = abs(xi) / scale
        if a >= e.max_normal:
            assert abs(qi) == e.max_normal * scale
            continue
        if e.int_kind:
            step = 2.0**-e.frac_bits
        else:
            step = 2.0 ** (max(math.frexp(a)[1] - 1 if a > 0 else e.emin, e.emin) - e.man_bits)
        assert abs(qi - xi) <= 0.5 * step * scale


# ---- bad input ----------------------------------------------------------------------------------


def test_bad_input():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="unknown format 'mxint3'.*valid formats: mxint8"):
        quantize(x, "mxint3")
    for bad in (0, -32, 1.5, "32", True):
        with pytest.raises(ValueError, match="block size must be a positive int"):
            quantize(x, "mxfp4", block_size=bad)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        quantize(x, "mxfp4", axis=2)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quantize(torch.ones(4, 32, dtype=torch.int32), "mxfp4")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quantize(torch.ones(4, 32, dtype=torch.complex64), "mxfp4")
    with pytest.raises(ValueError, match="unknown rounding mode 'up'.*nearest, even"):
        quantize(x, "mxfp4", rounding="up")
    with pytest.raises(ValueError, match="takes no block size"):
        quantize(x, "bf16", block_size=32)


# ---- shapes, blocks and the custom op ---------------------------------------------------------


def test_block_kinds_and_shapes():
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(5))
    assert torch.equal(quantize(x, "mxint4", block_size="vector"), quantize(x, "mxint4", block_size=96))
    assert torch.equal(
        quantize(x, "mxint4", block_size="tensor"), quantize(x.reshape(1, -1), "mxint4", block_size=384).reshape(4, 96)
    )
    assert quantize(torch.tensor(3.0), "mxfp4").shape == ()
    assert quantize(torch.empty(0, 32), "mxfp4").shape == (0, 32)
    for block in (16, 64, 128, 256, 512):
        p = pack(torch.randn(3, 512), "mxfp4", block_size=block)
        assert p.scales.shape == (3, 512 // block) and p.codes.numel() == 3 * 512 // 2


def test_packed_size_is_low_bit():
    w = torch.randn(256, 512)
    assert pack(w, "mxint4").nbytes == 256 * 512 // 2 + 256 * 16
    assert pack(w, "mxfp6_e2m3").nbytes == 256 * 512 * 6 // 8 + 256 * 16


def test_custom_op_survives_export_and_has_straight_through_grad():
    class M(torch.nn.Module):
        def forward(self, x):
            return quantize(x, "mxint4", block_size=16, axis=-1) * 2

    x = torch.randn(2, 64)
    ep = torch.export.export(M(), (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.mpqc.quantize.default in targets
    assert torch.equal(ep.module()(x), M()(x))
    y = x.clone().requires_grad_()
    quantize(y, "mxfp4").sum().backward()
    assert torch.equal(y.grad, torch.ones_like(x))
