"""The Triton quantize kernels (mpqc/formats/triton_quantize.py) equal the reference bit for bit.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, CPU tensors). The
interpreter is chosen when a kernel is decorated, so it runs in a subprocess (this file run
as a script) that imports the kernels with the variable set, runs every case below against
``quantize_reference`` and reports one result per case; each case is one test here. Where
triton is not installed those tests skip, saying so. The ``gpu`` test launches the real
kernels on CUDA and skips where there is none.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from mpqc.formats import FORMATS, kernels
from mpqc.formats.reference import quantize_reference

HAVE_TRITON = importlib.util.find_spec("triton") is not None
NO_TRITON = (
    "triton is not installed, so the Triton kernels' interpreter tests cannot run "
    "(pip install triton; the test extra installs it on Linux x86_64)"
)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRESETS = [
    "mxint8",
    "mxint4",
    "mxfp8_e4m3",
    "mxfp8_e5m2",
    "mxfp6_e2m3",
    "mxfp6_e3m2",
    "mxfp4",
    "nvfp4",
    "fp4_e2m1",
    "int8",
    "int4",
]
DTYPES = ["float32", "float16", "bfloat16"]
# (shape, axis, block): every power of two 16 .. 512, 1, a size that is not a power of two,
# "vector", ragged tails (length not a multiple of the block), a block longer than the axis,
# another axis, three dimensions.
SHAPES = [
    ((4, 64), 1, 32),  # whole blocks: the contiguous tile
    ((7, 130), 1, 16),  # ragged tail
    ((3, 70), 1, 512),  # one block longer than the axis
    ((6, 33), 1, 1),
    ((40, 9), 0, "vector"),  # along the first axis
    ((2, 3, 100), 1, "vector"),
    ((5, 96), 1, 48),  # not a power of two: padded lanes inside each block
    ((3, 256), 1, 64),
    ((2, 300), 1, 128),
    ((2, 520), -1, 256),
]


def _cases():
    """Every preset x rounding x dtype x (finite specials, Inf/NaN), shapes rotating."""
    cases, i = [], 0
    for p, name in enumerate(PRESETS):
        for rounding in ("nearest", "even"):
            for dtype in DTYPES:
                for kind in ("specials", "nonfinite"):
                    shape, axis, block = SHAPES[(i + p) % len(SHAPES)]
                    cases.append(
                        dict(
                            id=f"{name}-{block}-{rounding}-{dtype}-{kind}-{'x'.join(map(str, shape))}",
                            fmt=name,
                            shape=shape,
                            axis=axis,
                            block=block,
                            rounding=rounding,
                            dtype=dtype,
                            kind=kind,
                            seed=i,
                            options={},
                        )
                    )
                    i += 1
    # a "vector" longer than one tile: the looping kernel; and a long int block
    for p, name in enumerate(PRESETS):
        rounding, dtype = ("nearest", "even")[p % 2], DTYPES[p % 3]
        kind = "nonfinite" if p % 4 == 3 else "specials"
        for shape, block in (((1, 20000), "vector"), ((2, 20000), 10000)):
            cases.append(
                dict(
                    id=f"{name}-long{block}-{rounding}-{dtype}-{kind}",
                    fmt=name,
                    shape=shape,
                    axis=1,
                    block=block,
                    rounding=rounding,
                    dtype=dtype,
                    kind=kind,
                    seed=i,
                    options={},
                )
            )
            i += 1
    # NVFP4 block scales that fall exactly halfway between two E4M3 values (round half to even)
    for rounding in ("nearest", "even"):
        for dtype in DTYPES:
            for shape in ((4, 64), (3, 48)):
                cases.append(
                    dict(
                        id=f"nvfp4-16-scale_ties-{rounding}-{dtype}-{'x'.join(map(str, shape))}",
                        fmt="nvfp4",
                        shape=shape,
                        axis=1,
                        block=16,
                        rounding=rounding,
                        dtype=dtype,
                        kind="scale_ties",
                        seed=i,
                        options={},
                    )
                )
                i += 1
    # 64-bit offsets and other tilings compute the same numbers
    for name, options in (
        ("mxint4", {"index64": True}),
        ("nvfp4", {"index64": True}),
        ("mxfp4", {"index64": True}),
        ("mxfp8_e4m3", {"blocks_per_program": 2}),
        ("int4", {"blocks_per_program": 1}),
        ("mxint8", {"blocks_per_program": 64, "num_warps": 2}),
    ):
        for shape, axis, block in (SHAPES[1], SHAPES[5], ((1, 20000), 1, "vector")):
            opt = "-".join(f"{k}{v}" for k, v in options.items())
            cases.append(
                dict(
                    id=f"{name}-{block}-{opt}-{'x'.join(map(str, shape))}",
                    fmt=name,
                    shape=shape,
                    axis=axis,
                    block=block,
                    rounding="nearest",
                    dtype="bfloat16",
                    kind="specials",
                    seed=i,
                    options=options,
                )
            )
            i += 1
    return cases


CASES = _cases()


def make_input(shape, dtype: torch.dtype, kind: str, seed: int) -> torch.Tensor:
    """Random magnitudes over 2**-12 .. 2**12 with specials written in: zeros of both signs,
    ties, element-grid edges, the dtype's extremes and subnormals, a zero row, a row of
    subnormals, and for ``nonfinite`` Inf and NaN near the end (NVFP4: the whole tensor NaN)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "scale_ties":
        return _scale_ties(shape, g).to(dtype)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-12, 12, shape, generator=g).float())
    flat, length = x.view(-1), shape[-1]
    info = torch.finfo(dtype)
    specials = [
        0.0,
        -0.0,
        2.5,
        -2.5,
        0.75,
        -0.25,
        info.tiny,
        -info.tiny / 4,
        info.max,
        -info.max / 3,
        1e-40,
        5e-45,
        448.0,
        464.0,
        6.0,
        7.0,
        1.75,
        127.0 / 64,
        0.1875,
        -3.5,
    ]
    n = min(len(specials), flat.numel())
    flat[:n] = torch.tensor(specials[:n])
    if flat.numel() >= 3 * length:
        flat[length : 2 * length] = 0.0
        flat[2 * length : 3 * length] = torch.randn(length, generator=g) * info.tiny / 8
    if kind == "nonfinite":
        for i, v in ((-1, float("nan")), (-7, float("inf")), (-9, -float("inf"))):
            if flat.numel() >= -i:
                flat[i] = v
    return x.to(dtype)


def _scale_ties(shape, g: torch.Generator) -> torch.Tensor:
    """Blocks of 16 whose NVFP4 scale amax / (6 * tensor_scale) is an E4M3 tie: the tensor
    absmax 2688 makes the tensor scale exactly 1, and block maxima 6 * (4.25, 1.0625,
    2.5 * 2**-9, 200) sit halfway between E4M3 neighbours with an even lower one."""
    maxima = [2688.0, 25.5, 6.375, 15 * 2.0**-9, 1200.0]
    x = torch.empty(shape).view(-1, 16)
    for j in range(x.shape[0]):
        m = maxima[j % len(maxima)]
        x[j] = (torch.rand(16, generator=g) * 1.8 - 0.9) * m
        x[j, int(torch.randint(0, 16, (1,), generator=g))] = m if j % 2 else -m
    return x.view(shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns with NaNs made canonical: a NaN's payload carries no meaning, its place does."""
    t = torch.where(torch.isnan(t), torch.tensor(float("nan"), dtype=t.dtype, device=t.device), t)
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def compare(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor) -> str | None:
    """None if bit-identical, else a short description of the first differences."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"shape/dtype {tuple(got.shape)} {got.dtype} != {tuple(want.shape)} {want.dtype}"
    diff = bits(got) != bits(want)
    if not bool(diff.any()):
        return None
    where = diff.nonzero()[:4].tolist()
    shown = [f"x={x[tuple(i)].item()!r} got={got[tuple(i)].item()!r} want={want[tuple(i)].item()!r}" for i in where]
    return f"{int(diff.sum())} of {diff.numel()} differ, e.g. " + "; ".join(shown)


def run_case(case: dict, quantize) -> str | None:
    dtype = getattr(torch, case["dtype"])
    x = make_input(tuple(case["shape"]), dtype, case["kind"], case["seed"])
    fmt = FORMATS[case["fmt"]]
    axis = case["axis"] % x.dim()
    got = quantize(x, fmt, case["block"], axis, case["rounding"], **case["options"])
    return compare(got, quantize_reference(x, fmt, case["block"], axis, case["rounding"]), x)


# ---- the interpreter runs, in a subprocess -------------------------------------------------------


def _worker() -> None:
    """Run as a script with TRITON_INTERPRET=1: every case of stdin, results as JSON on stdout."""
    import numpy as np
    import triton

    np.seterr(all="ignore")  # the interpreter's numpy ops warn on the Inf/NaN cases
    from mpqc.formats import triton_quantize

    kernel = triton_quantize._qdq_tile_kernel
    results = {"triton": triton.__version__, "interpreted": type(kernel).__name__ == "InterpretedFunction", "cases": {}}
    t0 = time.perf_counter()
    for case in json.load(sys.stdin):
        try:
            results["cases"][case["id"]] = run_case(case, triton_quantize.quantize_triton) or "ok"
        except Exception as exc:  # noqa: BLE001 - reported per case
            results["cases"][case["id"]] = f"raised {type(exc).__name__}: {exc}"[:2000]
    results["seconds"] = time.perf_counter() - t0
    json.dump(results, sys.stdout)


@pytest.fixture(scope="module")
def interpreted():
    if not HAVE_TRITON:
        pytest.skip(NO_TRITON)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--interpret-worker"],
        input=json.dumps(CASES),
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise AssertionError(f"the interpreter worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def test_interpreter_ran(interpreted):
    assert interpreted["interpreted"], "the kernels were compiled, not interpreted: TRITON_INTERPRET did not apply"
    assert set(interpreted["cases"]) == {c["id"] for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_kernel_equals_reference(interpreted, case):
    assert interpreted["cases"][case["id"]] == "ok", interpreted["cases"][case["id"]]


# ---- the kernels inside whole models, interpreted -------------------------------------------------
# The cases above call the kernels directly. Here every quantize a compiled model makes (its
# cached weights; each linear input; Q, K^T, P and V of attention, some of them strided views)
# runs through the kernels, forced by MPQC_QUANTIZE_BACKEND=triton, which under TRITON_INTERPRET=1
# accepts CPU tensors. The logits must equal the same models' on the reference bit for bit: what
# tests/test_gpu.py checks on a GPU, checked on every CI run.

MODEL_CASES = [("llama", "float32"), ("llama", "bfloat16"), ("gpt2", "float16")]
MODEL_PLANS = ("mxint4", "mxfp4", "nvfp4", "mxfp6_e2m3", "mixed-b16-even")


def model_plans(graph):
    import mpqc

    plans = {name: mpqc.Plan.uniform(graph, name) for name in MODEL_PLANS[:-1]}
    formats = ("mxint4", "mxfp8_e4m3", "bf16", "mxint8", ("mxfp4", "mxint8"))
    mixed = {c.name: formats[i % len(formats)] for i, c in enumerate(graph.components("matmul"))}
    plans["mixed-b16-even"] = mpqc.Plan(graph, mixed, block_size=16, rounding="even")
    return plans


def model_logits() -> dict[str, torch.Tensor]:
    """Logits of tiny models under W+A plans, by whatever quantize backend is in force."""
    from tiny_models import example_ids, tiny_model

    import mpqc

    out = {}
    ids = example_ids((3, 11), seed=7)
    for arch, dtype in MODEL_CASES:
        graph = mpqc.capture(tiny_model(arch).to(getattr(torch, dtype)), (example_ids(),))
        for name, plan in model_plans(graph).items():
            with torch.no_grad():
                out[f"{arch}-{dtype}-{name}"] = mpqc.compile(graph, plan)(ids)
    return out


def _model_worker(path: str) -> None:
    """Run as a script with TRITON_INTERPRET=1 and the kernels forced: save the logits to ``path``."""
    import numpy as np

    np.seterr(all="ignore")
    from mpqc.formats import triton_quantize

    calls = []
    run = triton_quantize.quantize_triton

    def counted(x, *args, **kwargs):
        calls.append((tuple(x.shape), x.is_contiguous()))
        return run(x, *args, **kwargs)

    triton_quantize.quantize_triton = counted
    logits = model_logits()
    torch.save({"logits": logits, "calls": len(calls), "strided": sum(not c for _, c in calls)}, path)


@pytest.fixture(scope="module")
def interpreted_models(tmp_path_factory):
    if not HAVE_TRITON:
        pytest.skip(NO_TRITON)
    path = str(tmp_path_factory.mktemp("triton") / "logits.pt")
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        MPQC_QUANTIZE_BACKEND="triton",
        PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--interpret-models", path],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise AssertionError(f"the interpreter worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return torch.load(path)


def test_models_on_interpreted_kernels_equal_the_reference(interpreted_models, monkeypatch):
    # every quantize went through the kernels (weights, activations), some on strided views (K^T)
    assert interpreted_models["calls"] > 100 and interpreted_models["strided"] > 0, interpreted_models
    monkeypatch.setenv("MPQC_QUANTIZE_BACKEND", "reference")
    want = model_logits()
    got = interpreted_models["logits"]
    assert set(got) == set(want)
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"kernels differ from the reference inside these models: {differ}"
    for k in want:  # and the plans did quantize: no plan equals another
        assert not torch.isnan(want[k]).any(), k
    assert len({tuple(v.flatten()[:64].tolist()) for v in want.values()}) == len(want)


# ---- dispatch (no triton needed) ------------------------------------------------------------------


def test_cpu_auto_never_touches_triton(monkeypatch):
    """On the CPU the default path is what it was: the kernels module is never consulted."""

    def boom():
        raise AssertionError("the Triton path was consulted for a CPU tensor")

    monkeypatch.setattr(kernels, "_triton_module", boom)
    monkeypatch.setenv("MPQC_QUANTIZE_BACKEND", "auto")
    x = make_input((4, 64), torch.float32, "specials", 0)
    got = kernels.quantize(x, FORMATS["mxint4"], 32, 1, "nearest")
    assert compare(got, quantize_reference(x, FORMATS["mxint4"], 32, 1, "nearest"), x) is None


def test_forced_triton_on_cpu_says_why(monkeypatch):
    monkeypatch.setenv("MPQC_QUANTIZE_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(4, 64)
    with pytest.raises(RuntimeError, match="MPQC_QUANTIZE_BACKEND=triton"):
        kernels.quantize(x, FORMATS["mxfp4"], 32, 1, "nearest")
    # plain casts and "tensor" blocks stay on the reference under any backend
    assert torch.equal(kernels.quantize(x, FORMATS["bf16"], None, 1, "nearest"), x.bfloat16().float())
    got = kernels.quantize(x, FORMATS["int8"], "tensor", 1, "nearest")
    assert torch.equal(got, quantize_reference(x, FORMATS["int8"], "tensor", 1, "nearest"))


# ---- the real kernels on a GPU ---------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and HAVE_TRITON),
    reason=NO_TRITON if torch.cuda.is_available() else "needs CUDA: the compiled Triton kernels run on a GPU",
)
def test_gpu_kernels_equal_reference(monkeypatch):
    """Every case on the GPU through the default dispatch, against the reference on the same
    GPU tensor and on the CPU; then a larger tensor per preset and block."""
    monkeypatch.setenv("MPQC_QUANTIZE_BACKEND", "auto")
    from mpqc.formats import triton_quantize

    failures = []
    for case in CASES:
        dtype = getattr(torch, case["dtype"])
        x = make_input(tuple(case["shape"]), dtype, case["kind"], case["seed"])
        fmt, axis = FORMATS[case["fmt"]], case["axis"] % x.dim()
        xc = x.cuda()
        if case["options"]:
            got = triton_quantize.quantize_triton(xc, fmt, case["block"], axis, case["rounding"], **case["options"])
        else:
            got = kernels.quantize(xc, fmt, case["block"], axis, case["rounding"])
        for where, want in (
            ("cuda", quantize_reference(xc, fmt, case["block"], axis, case["rounding"])),
            ("cpu", quantize_reference(x, fmt, case["block"], axis, case["rounding"]).cuda()),
        ):
            problem = compare(got, want, xc)
            if problem:
                failures.append(f"{case['id']} vs reference on {where}: {problem}")
    g = torch.Generator(device="cuda").manual_seed(0)
    for name in PRESETS:
        for block in (16, 32, 512, "vector"):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                x = (torch.randn(512, 4096, generator=g, device="cuda") * 4).to(dtype)
                problem = compare(
                    kernels.quantize(x, FORMATS[name], block, 1, "even"),
                    quantize_reference(x, FORMATS[name], block, 1, "even"),
                    x,
                )
                if problem:
                    failures.append(f"{name} block {block} {dtype} 512x4096: {problem}")
    assert "Triton kernels" in kernels.describe()
    assert not failures, "\n".join(failures[:20])


if __name__ == "__main__" and sys.argv[1:] == ["--interpret-worker"]:
    _worker()
elif __name__ == "__main__" and sys.argv[1:2] == ["--interpret-models"]:
    _model_worker(sys.argv[2])
