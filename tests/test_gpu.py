"""The pipeline on a CUDA GPU in bf16: capture there, compile, search, torch.compile, predict.

Run where CUDA is present (``pytest -m gpu``; benchmarks/gpu/suite.sh does); elsewhere every
test here is skipped, visibly, and not counted as a pass. The CPU suite covers the same code
paths on the CPU; these catch what only a device shows: tensors left on the CPU, and the
Triton quantize kernels inside a whole model.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import example_ids, tiny_model

import mpqc
from mpqc.formats import kernels

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: runs the pipeline on a GPU"),
]


@pytest.fixture(scope="module")
def cuda_graph():
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    return mpqc.capture(model, (example_ids(),))  # CPU example ids follow the model


def test_capture_stays_on_the_gpu_and_kernels_equal_the_reference(cuda_graph, monkeypatch):
    assert cuda_graph.device.type == "cuda" and cuda_graph.dtype == torch.bfloat16
    plan = mpqc.Plan.uniform(cuda_graph, "mxint4")
    ids = example_ids((3, 11), seed=7).cuda()
    monkeypatch.setenv("MPQC_QUANTIZE_BACKEND", "reference")
    want = mpqc.compile(cuda_graph, plan)(ids)
    monkeypatch.setenv("MPQC_QUANTIZE_BACKEND", "auto")
    qmodel = mpqc.compile(cuda_graph, plan)
    assert "Triton" in kernels.describe()
    got = qmodel(ids)
    assert got.device.type == "cuda" and got.dtype == torch.bfloat16
    assert torch.equal(got, want)  # only the quantize implementation differs: bit for bit
    assert all(aq.choice.device.type == "cuda" for aq in qmodel.activation_quantizers)


def test_torch_compile_on_the_gpu_switches_plans_without_recompiling(cuda_graph):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    plans = [
        mpqc.Plan.uniform(cuda_graph, "bf16"),
        mpqc.Plan.uniform(cuda_graph, "mxint4"),
        mpqc.Plan.uniform(cuda_graph, "mxint4", activations=False),
    ]
    qmodel = mpqc.compile(cuda_graph, plans[1])
    qmodel.add_activation_formats({p.activation_format(m) for p in plans for m in cuda_graph.matmuls})
    counter = CompileCounter()
    traced = torch.compile(qmodel, backend=counter, fullgraph=True)
    inductor = qmodel.torch_compile()
    ids = example_ids((2, 12), seed=3).cuda()
    for plan in plans:
        qmodel.set_plan(plan)
        eager = qmodel(ids)
        assert torch.equal(traced(ids), eager)
        # Exact on the CPU (tests/test_torch_compile.py); a GPU's reduction order may move an ulp.
        torch.testing.assert_close(inductor(ids).float(), eager.float(), atol=0.1, rtol=0.05)
    assert counter.frame_count == 1


def test_search_with_the_sensitivity_sampler_on_the_gpu(cuda_graph):
    tokens = torch.randint(0, 128, (4000,), generator=torch.Generator().manual_seed(0))
    result = mpqc.search.run(
        cuda_graph,
        tokens,
        ratio=0.5,
        sampler="sensitivity",
        n_trials=3,
        seq_len=16,
        n_samples=4,
        batch_size=4,
        progress=False,
    )
    assert math.isfinite(result.perplexity) and abs(result.achieved - 0.5) < 0.2
    again = mpqc.search.run(
        cuda_graph,
        tokens,
        ratio=0.5,
        sampler="sensitivity",
        n_trials=3,
        seq_len=16,
        n_samples=4,
        batch_size=4,
        progress=False,
        torch_compile="aot_eager",
    )
    assert [t.values for t in again.study.trials] == [t.values for t in result.study.trials]


def test_predict_features_on_the_gpu(cuda_graph):
    from mpqc.evaluate import sample_windows
    from mpqc.search.budget import Budget, SearchSpace, search_precisions
    from mpqc.studies.predict import Features

    low_p, high_p = search_precisions("mxint4", "bf16", weights_only=False)
    space = SearchSpace(cuda_graph, "matmul", low_p, high_p, Budget("params", 0.0), None)
    windows = sample_windows(torch.randint(0, 128, (2000,), generator=torch.Generator().manual_seed(1)), 16, 4, 0)
    features = Features(mpqc.compile(cuda_graph, space.plan([])), space, windows, probe_samples=2)
    row = features.features(space.plan([c.name for c in space.components[:3]]))
    assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))
