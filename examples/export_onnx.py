"""Export a mixed-precision model to ONNX and run it in ONNX Runtime.

    python examples/export_onnx.py                       # SmolLM2-135M, a mixed plan, model.onnx
    python examples/export_onnx.py --plan best_plan.json --out smollm2.onnx   # a plan from `mpqc search`

Writes the file (weights in low-bit form, activation quantizers as mpqc.* functions,
precision metadata; docs/onnx.md), then prints what the metadata says and the perplexity
of the file in ONNX Runtime next to the compiled PyTorch model's.
"""

from __future__ import annotations

import argparse

import torch

import mpqc
import mpqc.export
from mpqc.data import load_tokens, split_tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None, help="local HF dir or .gguf; default: the embedded SmolLM2-135M")
    ap.add_argument("--plan", help="plan JSON; default: MXINT4 everywhere but the first and last layers and the head")
    ap.add_argument("--out", default="model.onnx")
    args = ap.parse_args()

    model, tokenizer = mpqc.load_model(args.model)
    graph = mpqc.capture(model, (torch.zeros(1, 16, dtype=torch.long),))
    if args.plan:
        with open(args.plan) as f:
            plan = mpqc.Plan.from_json(graph, f.read())
    else:
        layers = graph.components("layer")
        keep = {layers[0].name, layers[-2].name, layers[-1].name}  # first and last decoder layers, lm_head
        plan = mpqc.Plan(
            graph, {c.name: "bf16" for c in layers if c.name in keep}, default=("mxint4", "mxint8"), granularity="layer"
        )
    qmodel = mpqc.compile(graph, plan)
    result = mpqc.export.to_onnx(qmodel, args.out)
    print(
        f"wrote {result.path}: {result.file_bytes / 2**20:.1f} MiB, {result.weights} low-bit weights, "
        f"{result.activations} activation quantizers, in {sum(result.seconds.values()):.0f} s"
    )

    meta = mpqc.export.read_metadata(args.out)
    print(
        f"Q_r {meta['quantization_ratio']:.3f}, average bits {meta['average_bits']:.2f}, "
        f"{len(meta['components'])} components, {len(meta['nodes'])} quantizing nodes"
    )
    first = meta["nodes"][0]
    print(
        f"e.g. node {first['name']}: {first['kind']} {first['format']} block {first['block_size']} "
        f"for {', '.join(first['matmuls'])}"
    )

    _, holdout = split_tokens(load_tokens(tokenizer))
    windows = mpqc.evaluate.sample_windows(holdout, 128, 4, seed=0)
    lm = mpqc.export.OnnxRuntimeLM(args.out)
    print(
        f"perplexity: ONNX Runtime {mpqc.evaluate.perplexity(lm, windows=windows, progress=False):.3f}, "
        f"PyTorch {mpqc.evaluate.perplexity(qmodel, windows=windows, progress=False):.3f}"
    )


if __name__ == "__main__":
    main()
