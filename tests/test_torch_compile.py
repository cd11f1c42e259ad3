"""A compiled mixed-precision model under torch.compile: plan switches do not recompile it.

Dynamo guards on the Python values a forward reads; a quantizer that read its format as a
Python attribute would make every plan a new graph (and, past dynamo's recompile limit, a
silent fall back to eager). These tests count dynamo's frames and graph breaks across plan
switches, and check the compiled forward against the eager one bit for bit.
"""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import captured, example_ids
from torch._dynamo.testing import CompileCounter

import mpqc
from mpqc.formats import get_format
from mpqc.formats.reference import round_to_dtype


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def random_plans(graph, n, seed=0, low="mxint4", **kw):
    names = [c.name for c in mpqc.Plan.uniform(graph, low).components]
    rng = random.Random(seed)
    return [
        mpqc.Plan(graph, {c: low for c in rng.sample(names, rng.randint(1, len(names) - 1))}, **kw) for _ in range(n)
    ]


def test_plan_switches_reuse_one_graph():
    _, graph = captured("llama", "sdpa")
    plans = random_plans(graph, 10)
    qmodel = mpqc.compile(graph, plans[0])
    counter = CompileCounter()
    fast = torch.compile(qmodel, backend=counter, fullgraph=True)  # fullgraph: a graph break raises
    ids = example_ids((2, 12), seed=3)
    outputs = set()
    for plan in plans:
        qmodel.set_plan(plan)
        got = fast(ids)
        assert torch.equal(got, qmodel(ids))
        outputs.add(got.sum().item())
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for {len(plans)} plans"
    assert len(outputs) == len(plans)  # the plans really differ, and the compiled model follows them


def test_a_new_format_costs_one_recompile_and_declaring_it_none():
    _, graph = captured("qwen2", "sdpa")
    ids = example_ids((2, 12), seed=4)
    weight_only = mpqc.Plan.uniform(graph, "mxint4", activations=False)
    mixed = random_plans(graph, 1, low="mxfp4")[0]

    qmodel = mpqc.compile(graph, weight_only)  # candidates: no activation format at all
    counter = CompileCounter()
    fast = torch.compile(qmodel, backend=counter)
    fast(ids)
    qmodel.set_plan(mixed)  # brings mxfp4 and bf16 activations: one recompile
    assert torch.equal(fast(ids), qmodel(ids))
    qmodel.set_plan(weight_only)
    assert torch.equal(fast(ids), qmodel(ids))
    assert counter.frame_count == 2

    torch._dynamo.reset()
    declared = mpqc.compile(graph, weight_only)
    declared.add_activation_formats([get_format("mxfp4"), get_format("bf16")])
    counter = CompileCounter()
    fast = torch.compile(declared, backend=counter)
    for plan in (weight_only, mixed, weight_only):
        declared.set_plan(plan)
        assert torch.equal(fast(ids), declared(ids))
    assert counter.frame_count == 1


PLAN_KINDS = ["mixed", "mixed", "nvfp4", "fp16", "mxfp4-weights-b16"]


def plans_of_every_kind(graph):
    return [
        *random_plans(graph, 2, seed=1),
        mpqc.Plan.uniform(graph, "nvfp4"),
        mpqc.Plan(graph, {}, default="fp16"),
        mpqc.Plan.uniform(graph, "mxfp4", activations=False, block_size=16),
    ]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D weights, reduced along axis 0
def test_traced_forward_equals_eager_bit_for_bit(arch):
    # aot_eager runs the program dynamo and AOTAutograd trace, with eager kernels: equal
    # outputs mean the switched quantizers select exactly what the eager ones compute.
    _, graph = captured(arch, "sdpa")
    plans = plans_of_every_kind(graph)
    qmodel = mpqc.compile(graph, plans[0])
    fast = torch.compile(qmodel, backend="aot_eager", dynamic=True)
    with torch.no_grad():
        for i, plan in enumerate(plans):
            qmodel.set_plan(plan)
            ids = example_ids((1 + i % 3, 9 + 2 * i), seed=i)  # new shapes too
            assert torch.equal(fast(ids), qmodel(ids)), PLAN_KINDS[i]


def _nll(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()


def test_inductor_forward_matches_eager():
    # TorchInductor's own norms and activations differ from eager ones by float32 ulps, and
    # a quantizer may round such a value to the next grid point (NVFP4's tensor-wide scale
    # follows the maximum, so one ulp there moves every block). So the whole model agrees to
    # a loss tolerance; the fused quantize itself is exact (test_fused_activation_quantizer).
    _, graph = captured("llama", "sdpa")
    plans = plans_of_every_kind(graph)
    qmodel = mpqc.compile(graph, plans[0])
    fast = torch.compile(qmodel, dynamic=True)
    with torch.no_grad():
        for i, plan in enumerate(plans):
            qmodel.set_plan(plan)
            ids = example_ids((1 + i % 3, 9 + 2 * i), seed=i)
            got, want = fast(ids), qmodel(ids)
            assert abs(_nll(got, ids) / _nll(want, ids) - 1) < 2e-3, PLAN_KINDS[i]
            if PLAN_KINDS[i] == "mxfp4-weights-b16":  # weights come from the same cache: no activation rounding
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


FUSED_FORMATS = ["mxint4", "mxint8", "mxfp4", "mxfp6_e3m2", "mxfp8_e4m3", "nvfp4", "bf16", "fp16"]


def test_fused_activation_quantizers_are_exact():
    # The quantizers' compiled path, fused by Inductor with an elementwise op before it and a
    # matmul after it, equals the eager quantize bit for bit (one graph for all formats).
    from mpqc.quantizers import ActivationQuantizer

    quantizers = []
    for name in FUSED_FORMATS:
        fmt = get_format(name)
        aq = ActivationQuantizer(axis=-1, consumers=("a", "b"))
        aq.configure([fmt, None], "nearest", candidates=(None, fmt))
        quantizers.append(aq)
    w = torch.randn(96, 40, generator=torch.Generator().manual_seed(1))

    def layer(x, gain):
        return [q @ w for aq in quantizers for q in aq(x * gain)]

    x = torch.randn(3, 7, 96, generator=torch.Generator().manual_seed(2)) * 4
    gain = torch.rand(96, generator=torch.Generator().manual_seed(3)) + 0.5
    got = torch.compile(layer, dynamic=False)(x, gain)
    want = layer(x, gain)
    for i, (g, e) in enumerate(zip(got, want)):
        assert torch.equal(g, e), (FUSED_FORMATS[i // 2], "quantized" if i % 2 == 0 else "plain slot")


def test_bfloat16_model():
    model, _ = captured("llama", "sdpa")
    import copy

    graph = mpqc.capture(copy.deepcopy(model).to(torch.bfloat16), (example_ids(),))
    plans = random_plans(graph, 3, seed=2, low="mxint8")
    qmodel = mpqc.compile(graph, plans[0])
    counter = CompileCounter()
    fast = torch.compile(qmodel, backend=counter)
    ids = example_ids((2, 10), seed=5)
    for plan in plans:
        qmodel.set_plan(plan)
        assert torch.equal(fast(ids), qmodel(ids))
    assert counter.frame_count == 1


@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("target", [torch.bfloat16, torch.float16])
def test_round_to_dtype_is_the_cast_round_trip(source, target):
    g = torch.Generator().manual_seed(0)
    scaled = torch.randn(50_000, generator=g) * 10.0 ** torch.randint(-45, 39, (50_000,), generator=g).float()
    any_bits = torch.randint(-(2**31), 2**31 - 1, (50_000,), generator=g, dtype=torch.int32).view(torch.float32)
    edges = torch.tensor(
        [
            0.0,
            -0.0,
            float("inf"),
            -float("inf"),
            float("nan"),
            65504.0,
            65519.99,
            65520.0,
            -65520.0,
            5.96e-8,
            2.98e-8,
            2.99e-8,
            1e-45,
            3.4e38,
            1.0 + 2**-8,
            1.0 + 3 * 2**-8,
        ]
    )
    x = torch.cat([scaled, any_bits, edges]).to(source)
    expected = x.to(target).to(source)
    bits = torch.int32 if source == torch.float32 else torch.int16
    for got in (round_to_dtype(x, target), torch.compile(round_to_dtype)(x, target)):
        same = (got.view(bits) == expected.view(bits)) | (got.isnan() & expected.isnan())
        assert same.all(), x[~same][:5]


def test_activation_quantization_fuses_into_the_norm_before_it():
    # RMSNorm, its gain, the block absmax, the rounding and the plan's slot selection become one
    # generated loop: the quantized activation costs no pass over memory of its own.
    import re

    from torch._inductor.utils import run_and_get_code

    from mpqc.quantizers import ActivationQuantizer

    fmt = get_format("mxint4")
    aq = ActivationQuantizer(axis=-1, consumers=("q", "k"))
    aq.configure([fmt, None], "nearest", candidates=(None, fmt))
    w = torch.randn(96, 40)

    def block(x, gain):
        q, k = aq(torch.nn.functional.rms_norm(x, (96,)) * gain)
        return q @ w, k @ w

    x, gain = torch.randn(3, 7, 96), torch.rand(96)
    out, (code, *_) = run_and_get_code(torch.compile(block), x, gain)
    kernels = re.findall(r"^(cpp_fused_\w+) = ", code, re.M)
    assert len(kernels) == 1, kernels
    # (Inductor's norm differs from eager's by ulps, so the outputs are compared elsewhere.)
    torch.testing.assert_close(out[1], block(x, gain)[1])


def test_inductor_on_a_bf16_model_equals_eager_bit_for_bit():
    """qmodel.torch_compile() has Inductor round 16-bit intermediates as eager does; without
    that, a bf16 model's quantizers see float32 intermediates (here: logits off by 0.18)."""
    model, _ = captured("llama", "sdpa")
    import copy

    graph = mpqc.capture(copy.deepcopy(model).to(torch.bfloat16), (example_ids(),))
    plans = [mpqc.Plan.uniform(graph, "bf16"), mpqc.Plan.uniform(graph, "mxint4"), *random_plans(graph, 2, seed=4)]
    qmodel = mpqc.compile(graph, plans[1])
    fast = qmodel.torch_compile()
    ids = example_ids((2, 12), seed=3)
    for plan in plans:
        qmodel.set_plan(plan)
        assert torch.equal(fast(ids), qmodel(ids)), str(plan)
