"""ONNX export: file sizes, ONNX Runtime against the compiled model, and export time, per plan.

For each plan: the file size and its ratio to the fp32 export, the stored matmul-weight
bytes, the relative error ||ort - torch|| / ||torch|| of the logits on held-out windows,
perplexity in both runtimes, and seconds (the one-time torch.onnx translation, then
encoding and writing for each plan). Plans: fp32, weight-only MXINT4, a mixed plan
(MXINT4 / MXFP4 / BF16 weights by a seeded draw, activations MXINT8 where the weights are
low, BF16 elsewhere), and W+A MXINT4.

    python benchmarks/export.py                       # the embedded SmolLM2-135M (slow: minutes)
    python benchmarks/export.py --tiny                # a tiny random Llama (seconds)
    python benchmarks/export.py --json export.json --out /tmp/mpqc-export
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import torch

import mpqc
import mpqc.export


def mixed_plan(graph, seed: int = 0):
    rng = random.Random(seed)
    assignments = {}
    for c in graph.components("matmul"):
        w = rng.choice(["mxint4", "mxint4", "mxfp4", "bf16"])
        assignments[c.name] = (w, "bf16" if w == "bf16" else "mxint8")
    return mpqc.Plan(graph, assignments, default="bf16")


def load(tiny: bool):
    if tiny:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        cfg = LlamaConfig(
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=4096,
        )
        model = AutoModelForCausalLM.from_config(cfg).eval()
        tokens = torch.randint(0, 4096, (20_000,), generator=torch.Generator().manual_seed(0))
        return "tiny Llama (4 x 256, random)", model, tokens
    from mpqc.data import load_tokens, split_tokens

    model, tokenizer = mpqc.load_model()
    _, holdout = split_tokens(load_tokens(tokenizer))
    return "SmolLM2-135M", model, holdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2-135M")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--out", default=None, help="directory for the ONNX files (default: a temporary one)")
    ap.add_argument("--json")
    args = ap.parse_args()

    name, model, tokens = load(args.tiny)
    t0 = time.perf_counter()
    graph = mpqc.capture(model, (torch.zeros(1, 16, dtype=torch.long),))
    capture_s = time.perf_counter() - t0
    windows = mpqc.evaluate.sample_windows(tokens, args.seq_len, args.n_samples, seed=0)
    plans = {
        "fp32": mpqc.Plan.uniform(graph, "fp32"),
        "W mxint4": mpqc.Plan.uniform(graph, "mxint4", activations=False, high="fp32"),
        "mixed": mixed_plan(graph),
        "W+A mxint4": mpqc.Plan.uniform(graph, "mxint4"),
    }
    out = args.out or tempfile.mkdtemp(prefix="mpqc-export-")
    os.makedirs(out, exist_ok=True)
    qmodel = mpqc.compile(graph, plans["fp32"])
    rows = []
    for label, plan in plans.items():
        qmodel.set_plan(plan)
        path = os.path.join(out, label.replace(" ", "_").replace("+", "") + ".onnx")
        result = mpqc.export.to_onnx(qmodel, path, progress=False)
        t0 = time.perf_counter()
        lm = mpqc.export.OnnxRuntimeLM(path)
        session_s = time.perf_counter() - t0
        with torch.no_grad():
            a, b = lm(windows), qmodel(windows)
        kw = dict(windows=windows, batch_size=args.n_samples, progress=False)
        rows.append(
            {
                "plan": label,
                "quantization_ratio": plan.quantization_ratio(),
                "average_bits": plan.average_bits(),
                "file_bytes": result.file_bytes,
                "weight_bytes": result.weight_bytes,
                "rel_err_logits": ((a - b).norm() / b.norm()).item(),
                "ppl_onnxruntime": mpqc.evaluate.perplexity(lm, **kw),
                "ppl_torch": mpqc.evaluate.perplexity(qmodel, **kw),
                "seconds": {**result.seconds, "ort_session": session_s},
            }
        )
    base = rows[0]["file_bytes"]
    print(
        f"{name}: capture {capture_s:.1f} s, torch.onnx translation {rows[0]['seconds']['torch_export']:.1f} s "
        f"(once per compiled model); {args.n_samples} x {args.seq_len} tokens"
    )
    print(
        f"{'plan':<12} {'Q_r':>6} {'bits':>6} {'MiB':>8} {'x fp32':>7} {'weights MiB':>12} {'rel err':>9} "
        f"{'ppl ORT':>9} {'ppl torch':>9} {'encode s':>9} {'write s':>8}"
    )
    for r in rows:
        s = r["seconds"]
        print(
            f"{r['plan']:<12} {r['quantization_ratio']:>6.3f} {r['average_bits']:>6.2f} {r['file_bytes'] / 2**20:>8.2f} "
            f"{r['file_bytes'] / base:>7.3f} {r['weight_bytes'] / 2**20:>12.2f} {r['rel_err_logits']:>9.2g} "
            f"{r['ppl_onnxruntime']:>9.3f} {r['ppl_torch']:>9.3f} {s['encode']:>9.1f} "
            f"{s['save'] + s.get('check', 0):>8.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": name, "capture_seconds": capture_s, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
