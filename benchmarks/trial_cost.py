"""Search trials per hour on the real SmolLM2-135M, next to the full-forward lower bound.

A trial is what ``mpqc.search.run`` does per plan: the sampler's step, ``set_plan`` and the
loss over ``n_samples`` windows of ``seq_len`` tokens. Its lower bound is the same loss
computed by the captured model with no quantizer at all (eager, and under torch.compile
for the compiled search). The search runs N random-sampler trials at Q_r, MXINT4 weights
and activations vs BF16, matmul granularity; the first trial of each search (weight
quantization, and the compile) is reported apart, the rest as a median.

    python benchmarks/trial_cost.py [--trials 12] [--ratio 0.9] [--seq-len 128] [--n-samples 8] [--json out.json]
    python benchmarks/trial_cost.py --device cuda --dtype bfloat16 --random-weights --n-samples 32 --seq-len 512

``--random-weights`` builds SmolLM2-135M's architecture (the GGUF's config) with random
weights and random token ids, for a machine the 93 MB model file cannot reach (the GPU
machine here): a trial's cost does not depend on the weights' values, its perplexities
are meaningless. ``--skip-compiled`` drops the torch.compile half.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import mpqc
from mpqc.data import load_tokens, split_tokens
from mpqc.evaluate import nll, sample_windows

# SmolLM2-135M-Instruct as its GGUF loads (transformers' LlamaConfig of the real model).
SMOLLM2_135M = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def trial_seconds(result) -> list[float]:
    trials = sorted(result.study.trials, key=lambda t: t.number)
    return [t.duration.total_seconds() for t in trials]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--ratio", type=float, default=0.9)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--random-weights", action="store_true", help="SmolLM2-135M's shape, random weights and tokens")
    ap.add_argument("--skip-compiled", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()

    torch.manual_seed(0)
    device, dtype = mpqc.models.parse_device(args.device), getattr(torch, args.dtype)
    if args.random_weights:
        with device:
            model = AutoModelForCausalLM.from_config(SMOLLM2_135M, dtype=dtype, attn_implementation="sdpa").eval()
        tokens = torch.randint(0, SMOLLM2_135M.vocab_size, (200_000,), generator=torch.Generator().manual_seed(0))
    else:
        model, tokenizer = mpqc.load_model(device=device, dtype=dtype)
        tokens, _ = split_tokens(load_tokens(tokenizer))
    graph = mpqc.capture(model, (torch.zeros(2, 64, dtype=torch.long),))
    windows = sample_windows(tokens, args.seq_len, args.n_samples, 0)
    high = {"float32": "bf16", "bfloat16": "bf16", "float16": "fp16"}[args.dtype]
    search = dict(
        ratio=args.ratio,
        sampler="random",
        high=high,
        n_trials=args.trials,
        seq_len=args.seq_len,
        n_samples=args.n_samples,
        batch_size=args.n_samples,
        seed=0,
        progress=False,
    )
    rows = {}
    with torch.no_grad():
        nll(graph.module, windows=windows, progress=False)  # warm up
        rows["lower bound, eager"] = timed(lambda: nll(graph.module, windows=windows, progress=False), args.repeats)
    eager = mpqc.search.run(graph, tokens, **search)
    rows["trial, eager"] = trial_seconds(eager)[1:]
    first_eager = trial_seconds(eager)[0]

    if args.skip_compiled:
        report(args, rows, first_eager, None, None, None, device, model)
        return
    torch._dynamo.reset()
    compiled_graph = torch.compile(graph.module, options={"emulate_precision_casts": True})
    t0 = time.perf_counter()
    with torch.no_grad():
        nll(compiled_graph, windows=windows, progress=False)
    lower_compile = time.perf_counter() - t0
    with torch.no_grad():
        rows["lower bound, torch.compile"] = timed(
            lambda: nll(compiled_graph, windows=windows, progress=False), args.repeats
        )
    compiled = mpqc.search.run(graph, tokens, torch_compile=True, **search)
    rows["trial, torch.compile"] = trial_seconds(compiled)[1:]
    first_compiled = trial_seconds(compiled)[0]
    same = [t.values for t in eager.study.trials] == [t.values for t in compiled.study.trials]
    diffs = [abs(a.values[0] / b.values[0] - 1) for a, b in zip(eager.study.trials, compiled.study.trials)]
    report(args, rows, first_eager, first_compiled, lower_compile, (same, max(diffs)), device, model)


def report(args, rows, first_eager, first_compiled, lower_compile, agreement, device, model):
    med = {k: statistics.median(v) for k, v in rows.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    what = "SmolLM2-135M's shape, random weights" if args.random_weights else "SmolLM2-135M"
    print(
        f"\n{what} ({sum(p.numel() for p in model.parameters()):,} parameters, {args.dtype}) on {where}, "
        f"torch {torch.__version__}; a trial = {args.n_samples} x {args.seq_len} tokens, random plans at Q_r "
        f"{args.ratio} (MXINT4 W+A / BF16, matmul granularity); medians"
    )
    print(f"{'':<28} {'s/trial':>8} {'trials/hour':>12} {'x lower bound':>14}")
    modes = [("eager", "lower bound, eager")]
    if first_compiled is not None:
        modes.append(("torch.compile", "lower bound, torch.compile"))
    for name, bound in modes:
        for key in (bound, f"trial, {name}"):
            print(f"{key:<28} {med[key]:>8.3f} {3600 / med[key]:>12.0f} {med[key] / med[bound]:>14.2f}")
    if first_compiled is None:
        print(f"first trial (weights quantized): eager {first_eager:.1f} s")
    else:
        same, largest = agreement
        print(f"torch.compile trial vs eager trial: {med['trial, torch.compile'] / med['trial, eager']:.2f}x")
        print(
            f"first trial (weights quantized; compile): eager {first_eager:.1f} s, torch.compile "
            f"{first_compiled:.1f} s (the unquantized model's compile: {lower_compile:.1f} s)"
        )
        print(f"same perplexities eager vs compiled: {same} (largest relative difference {largest:.1e})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "config": vars(args),
                    "device": where,
                    "medians": med,
                    "rows": rows,
                    "first_trial": {"eager": first_eager, "compiled": first_compiled},
                    "max_relative_difference": None if agreement is None else agreement[1],
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
