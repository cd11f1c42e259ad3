"""What switching plans costs next to one forward, on a Llama-shaped model (CPU or GPU).

Prints medians (interleaved runs) of: the model's own forward (Hugging Face, SDPA
attention), a forward of the captured graph (attention decomposed into its two matmuls, so
they can be quantized), the compiled model on its unquantized plan and on a W+A MXINT4
plan (every linear input, both operands of both attention matmuls), and set_plan between
two already-seen plans (the cost of a search trial beyond its evaluation), with ratios.
With ``--torch-compile`` also the same under torch.compile: the captured graph compiled,
and one compiled mixed-precision model switched between the two plans (no recompile
between them); ``--no-fresh-compile`` skips a third compile, of a model that has only seen
the unquantized plan (the slowest part on a large model).

    python benchmarks/set_plan.py [--hidden 512] [--layers 4] [--batch 4] [--seq 256] [--json out.json]
    python benchmarks/set_plan.py --preset llama-0.95b --device cuda --dtype bfloat16 --torch-compile

``--preset llama-0.95b``: hidden 2048, 16 layers, 32 heads (no GQA), MLP 5632, vocab 32000,
untied (0.95B parameters), 32 x 512 tokens: the issue's GPU target model. Random weights:
timing does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import mpqc

PRESETS = {
    # hidden, layers, heads, kv heads, intermediate, vocab, batch, seq
    "llama-0.95b": dict(
        hidden=2048, layers=16, heads=32, kv_heads=32, intermediate=5632, vocab=32000, batch=32, seq=512
    ),
}
UNQUANTIZED = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a named model shape (overrides sizes)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=None, help="default hidden / 64")
    ap.add_argument("--kv-heads", type=int, default=None, help="default hidden / 128")
    ap.add_argument("--intermediate", type=int, default=None, help="default 3 x hidden")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(UNQUANTIZED))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torch-compile", action="store_true")
    ap.add_argument("--no-fresh-compile", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.preset:
        for k, v in PRESETS[args.preset].items():
            setattr(args, k, v)
    heads = args.heads or args.hidden // 64
    device = mpqc.models.parse_device(args.device)
    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=args.kv_heads or args.hidden // 128,
        vocab_size=args.vocab,
        tie_word_embeddings=False,
    )
    with device:  # initialized where it runs: a 0.95B model's random init is slow on the CPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    n_params = sum(p.numel() for p in model.parameters())
    graph = mpqc.capture(model, (torch.zeros(1, 16, dtype=torch.long),))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    base_fmt = UNQUANTIZED[args.dtype]
    base, w4a4 = mpqc.Plan.uniform(graph, base_fmt), mpqc.Plan.uniform(graph, "mxint4")
    q = mpqc.compile(graph, base)
    rows = {}
    with torch.no_grad():
        model(ids, use_cache=False), graph.module(ids)
        q.set_plan(w4a4), q(ids), q(ids)  # warm up: quantize weights once, compile the quantize kernels
        q.set_plan(base), q(ids)
        for _ in range(args.repeats):  # interleave the measurements
            rows.setdefault("model forward (HF, SDPA)", []).append(timed(lambda: model(ids, use_cache=False)))
            rows.setdefault("captured graph forward", []).append(timed(lambda: graph.module(ids)))
            q.set_plan(base)
            rows.setdefault("compiled forward, unquantized plan", []).append(timed(lambda: q(ids)))
            rows.setdefault("set_plan (seen plan)", []).append(timed(lambda: q.set_plan(w4a4)))
            rows.setdefault("compiled forward, W+A MXINT4 plan", []).append(timed(lambda: q(ids)))
        if args.torch_compile:
            compile_s = {}
            t0 = time.perf_counter()
            compiled_graph = torch.compile(graph.module, options={"emulate_precision_casts": True})
            compiled_graph(ids)
            compile_s["captured graph"] = time.perf_counter() - t0
            if not args.no_fresh_compile:
                t0 = time.perf_counter()
                fresh = mpqc.compile(graph, base)  # a compiled model that has only seen one plan: no quantizer runs
                compiled_fresh = fresh.torch_compile()
                compiled_fresh(ids)
                compile_s["unquantized plan only"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            switched = mpqc.compile(graph, w4a4)
            switched.add_activation_formats([base.activation_format(graph.matmuls[0])])
            compiled_switched = switched.torch_compile()
            compiled_switched(ids)
            compile_s["switchable model"] = time.perf_counter() - t0
            switched.set_plan(base), compiled_switched(ids)
            frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            for _ in range(args.repeats):
                rows.setdefault("torch.compile: captured graph", []).append(timed(lambda: compiled_graph(ids)))
                if not args.no_fresh_compile:
                    rows.setdefault("torch.compile: unquantized plan (only plan)", []).append(
                        timed(lambda: compiled_fresh(ids))
                    )
                switched.set_plan(base)
                rows.setdefault("torch.compile: unquantized plan (switched)", []).append(
                    timed(lambda: compiled_switched(ids))
                )
                switched.set_plan(w4a4)
                rows.setdefault("torch.compile: W+A MXINT4 (switched)", []).append(
                    timed(lambda: compiled_switched(ids))
                )
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames, "a plan switch recompiled"
    med = {k: statistics.median(v) for k, v in rows.items()}
    ref = med["compiled forward, unquantized plan"]
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"Llama hidden {args.hidden}, {args.layers} layers, {n_params / 1e9:.3f}B parameters, {args.dtype}, "
        f"{args.batch} x {args.seq} tokens, {where}, torch {torch.__version__}, median of {args.repeats}"
    )
    print(f"{'what':<44} {'ms':>9} {'x unquantized plan':>19}")
    for k, v in med.items():
        print(f"{k:<44} {v * 1e3:>9.2f} {v / ref:>19.4f}")
    hf = med["model forward (HF, SDPA)"]
    print(
        f"eager W+A MXINT4 / HF forward: {med['compiled forward, W+A MXINT4 plan'] / hf:.3f}; "
        f"/ captured graph: {med['compiled forward, W+A MXINT4 plan'] / med['captured graph forward']:.3f}"
    )
    if args.torch_compile:
        mx = med["torch.compile: W+A MXINT4 (switched)"]
        print(
            f"torch.compile W+A MXINT4 / HF forward: {mx / hf:.3f}; / compiled captured graph: "
            f"{mx / med['torch.compile: captured graph']:.3f}"
            + (
                f"; / compiled unquantized plan (only plan): {mx / med['torch.compile: unquantized plan (only plan)']:.3f}"
                if not args.no_fresh_compile
                else ""
            )
            + f"; eager W+A MXINT4 / torch.compile W+A MXINT4: {med['compiled forward, W+A MXINT4 plan'] / mx:.2f}"
        )
        print("compile seconds (first call): " + ", ".join(f"{k} {v:.1f}" for k, v in compile_s.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "config": vars(args),
                    "params": n_params,
                    "device": where,
                    "medians_s": med,
                    "compile_s": compile_s if args.torch_compile else None,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
