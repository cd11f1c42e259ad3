"""What switching plans costs next to one forward, on a Llama-shaped model on the CPU.

Prints medians (interleaved runs) of: a forward of the captured fp32 graph, a forward of
the compiled model on an fp32 plan and on a W+A MXINT4 plan, and set_plan between two
already-seen plans (the cost of a search trial beyond its evaluation), with ratios. With
``--torch-compile`` also the same under torch.compile: the captured graph compiled, and one
compiled mixed-precision model switched between the two plans (no recompile between them).

    python benchmarks/set_plan.py [--hidden 512] [--layers 4] [--batch 4] [--seq 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import mpqc


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torch-compile", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128, vocab_size=8192)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    graph = mpqc.capture(model, (torch.zeros(1, 16, dtype=torch.long),))
    ids = torch.randint(0, 8192, (args.batch, args.seq))
    fp32, w4a4 = mpqc.Plan.uniform(graph, "fp32"), mpqc.Plan.uniform(graph, "mxint4")
    q = mpqc.compile(graph, fp32)
    with torch.no_grad():
        q.set_plan(w4a4), q(ids), q(ids)  # warm up: quantize weights once, compile the quantize kernels
        q.set_plan(fp32), q(ids)
        rows = {}
        for _ in range(args.repeats):  # interleave the measurements
            rows.setdefault("captured graph forward", []).append(median_time(lambda: graph.module(ids), 1))
            q.set_plan(fp32)
            rows.setdefault("compiled forward, fp32 plan", []).append(median_time(lambda: q(ids), 1))
            rows.setdefault("set_plan (seen plan)", []).append(median_time(lambda: q.set_plan(w4a4), 1))
            rows.setdefault("compiled forward, W+A MXINT4 plan", []).append(median_time(lambda: q(ids), 1))
        if args.torch_compile:
            compiled_graph = torch.compile(graph.module)
            fresh = mpqc.compile(graph, fp32)  # a compiled model that has only seen fp32: no quantizer runs
            compiled_fresh = torch.compile(fresh)
            switched = mpqc.compile(graph, w4a4)
            switched.add_activation_formats([w4a4.activation_format(graph.matmuls[0])])
            compiled_switched = torch.compile(switched)
            compiled_graph(ids), compiled_fresh(ids), compiled_switched(ids)
            switched.set_plan(fp32), compiled_switched(ids)
            frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            for _ in range(args.repeats):
                rows.setdefault("torch.compile: captured graph", []).append(median_time(lambda: compiled_graph(ids), 1))
                rows.setdefault("torch.compile: fp32 plan (only plan)", []).append(
                    median_time(lambda: compiled_fresh(ids), 1))
                switched.set_plan(fp32)
                rows.setdefault("torch.compile: fp32 plan (switched)", []).append(
                    median_time(lambda: compiled_switched(ids), 1))
                switched.set_plan(w4a4)
                rows.setdefault("torch.compile: W+A MXINT4 (switched)", []).append(
                    median_time(lambda: compiled_switched(ids), 1))
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames, "a plan switch recompiled"
    med = {k: statistics.median(v) for k, v in rows.items()}
    base = med["compiled forward, fp32 plan"]
    print(f"Llama hidden {args.hidden}, {args.layers} layers, {args.batch} x {args.seq} tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'what':<36} {'ms':>9} {'x fp32-plan forward':>20}")
    for k, v in med.items():
        print(f"{k:<36} {v * 1e3:>9.2f} {v / base:>20.4f}")
    if args.torch_compile:
        print(f"torch.compile, W+A MXINT4 / fp32 plan (only plan): "
              f"{med['torch.compile: W+A MXINT4 (switched)'] / med['torch.compile: fp32 plan (only plan)']:.3f}; "
              f"eager W+A MXINT4 / torch.compile W+A MXINT4: "
              f"{med['compiled forward, W+A MXINT4 plan'] / med['torch.compile: W+A MXINT4 (switched)']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in med.items()}, f, indent=1)


if __name__ == "__main__":
    main()
