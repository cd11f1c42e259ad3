"""Search trials per hour on the real SmolLM2-135M, next to the full-forward lower bound.

A trial is what ``mpqc.search.run`` does per plan: the sampler's step, ``set_plan`` and the
loss over ``n_samples`` windows of ``seq_len`` tokens. Its lower bound is the same loss
computed by the captured model with no quantizer at all (eager, and under torch.compile
for the compiled search). The search runs N random-sampler trials at Q_r, MXINT4 weights
and activations vs BF16, matmul granularity; the first trial of each search (weight
quantization, and the compile) is reported apart, the rest as a median.

    python benchmarks/trial_cost.py [--trials 12] [--ratio 0.9] [--seq-len 128] [--n-samples 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import mpqc
from mpqc.data import load_tokens, split_tokens
from mpqc.evaluate import nll, sample_windows


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
    ap.add_argument("--json")
    args = ap.parse_args()

    torch.manual_seed(0)
    model, tokenizer = mpqc.load_model()
    graph = mpqc.capture(model, (torch.zeros(2, 64, dtype=torch.long),))
    tokens, _ = split_tokens(load_tokens(tokenizer))
    windows = sample_windows(tokens, args.seq_len, args.n_samples, 0)
    search = dict(ratio=args.ratio, sampler="random", n_trials=args.trials, seq_len=args.seq_len,
                  n_samples=args.n_samples, batch_size=args.n_samples, seed=0, progress=False)
    rows = {}
    with torch.no_grad():
        nll(graph.module, windows=windows, progress=False)  # warm up
        rows["lower bound, eager"] = timed(lambda: nll(graph.module, windows=windows, progress=False), args.repeats)
    eager = mpqc.search.run(graph, tokens, **search)
    rows["trial, eager"] = trial_seconds(eager)[1:]
    first_eager = trial_seconds(eager)[0]

    torch._dynamo.reset()
    compiled_graph = torch.compile(graph.module)
    t0 = time.perf_counter()
    with torch.no_grad():
        nll(compiled_graph, windows=windows, progress=False)
    lower_compile = time.perf_counter() - t0
    with torch.no_grad():
        rows["lower bound, torch.compile"] = timed(lambda: nll(compiled_graph, windows=windows, progress=False),
                                                   args.repeats)
    compiled = mpqc.search.run(graph, tokens, torch_compile=True, **search)
    rows["trial, torch.compile"] = trial_seconds(compiled)[1:]
    first_compiled = trial_seconds(compiled)[0]
    same = [t.values for t in eager.study.trials] == [t.values for t in compiled.study.trials]
    diffs = [abs(a.values[0] / b.values[0] - 1) for a, b in zip(eager.study.trials, compiled.study.trials)]

    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"\nSmolLM2-135M on {torch.get_num_threads()} CPU threads; a trial = {args.n_samples} x {args.seq_len} "
          f"tokens, random plans at Q_r {args.ratio} (MXINT4 W+A / BF16, matmul granularity); medians")
    print(f"{'':<28} {'s/trial':>8} {'trials/hour':>12} {'x lower bound':>14}")
    for name, bound in (("eager", "lower bound, eager"), ("torch.compile", "lower bound, torch.compile")):
        for key in (bound, f"trial, {name}"):
            print(f"{key:<28} {med[key]:>8.3f} {3600 / med[key]:>12.0f} {med[key] / med[bound]:>14.2f}")
    print(f"torch.compile trial vs eager trial: {med['trial, torch.compile'] / med['trial, eager']:.2f}x")
    print(f"first trial (weights quantized; compile): eager {first_eager:.1f} s, torch.compile {first_compiled:.1f} s "
          f"(the unquantized model's compile: {lower_compile:.1f} s)")
    print(f"same perplexities eager vs compiled: {same} (largest relative difference {max(diffs):.1e})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"medians": med, "rows": rows, "first_trial": {"eager": first_eager, "compiled": first_compiled},
                       "max_relative_difference": max(diffs)}, f, indent=1)


if __name__ == "__main__":
    main()
