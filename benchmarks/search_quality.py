"""How fast each search strategy finds a good plan, on the real SmolLM2-135M (CPU).

For each Q_r budget (matmul granularity, MXINT4 weights and activations vs BF16), runs
random search (the paper's method), TPE, and our sensitivity-seeded strategy for N trials
each on the same windows, and prints the best perplexity after 10, 25 and 50 trials, and
the first trial at which each strategy reaches random search's final result. The
sensitivity pass costs about one trial per window; its time is printed beside it.

    python benchmarks/search_quality.py [--ratios 0.5,0.9,0.95] [--trials 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import mpqc
from mpqc.data import load_tokens, split_tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.5,0.9,0.95")
    ap.add_argument("--strategies", default="random,tpe,sensitivity")
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()

    model, tokenizer = mpqc.load_model()
    graph = mpqc.capture(model, (torch.zeros(1, 16, dtype=torch.long),))
    search_tokens, _ = split_tokens(load_tokens(tokenizer))
    qmodel = mpqc.compile(graph, mpqc.Plan.uniform(graph, "bf16"))
    checkpoints = [c for c in (10, 25, 50) if c <= args.trials] or [args.trials]
    rows = []
    for ratio in map(float, args.ratios.split(",")):
        curves = {}
        for strategy in args.strategies.split(","):
            t0 = time.perf_counter()
            result = mpqc.search.run(
                graph,
                search_tokens,
                ratio=ratio,
                sampler=strategy,
                n_trials=args.trials,
                seq_len=args.seq_len,
                n_samples=args.n_samples,
                seed=args.seed,
                qmodel=qmodel,
                progress=False,
            )
            seconds = time.perf_counter() - t0
            best, curve = math.inf, []
            for t in sorted(result.study.trials, key=lambda t: t.number):
                best = min(best, t.value)
                curve.append(best)
            curves[strategy] = curve
            rows.append(
                {
                    "ratio": ratio,
                    "strategy": strategy,
                    "seconds": seconds,
                    "curve": curve,
                    **{f"best@{c}": curve[c - 1] for c in checkpoints},
                }
            )
            print(f"Q_r {ratio}: {strategy} done in {seconds:.0f} s, best {curve[-1]:.3f}", flush=True)
        target = curves.get("random", [math.inf])[-1]
        for r in rows:
            if r["ratio"] == ratio:
                hit = next((i + 1 for i, v in enumerate(r["curve"]) if v <= target), None)
                r["trials_to_random_final"] = hit
    print(
        f"\nSmolLM2-135M, MXINT4 W+A vs BF16, matmul granularity, {args.n_samples} x {args.seq_len} tokens "
        f"per trial, seed {args.seed}"
    )
    head = " ".join(f"{'best@' + str(c):>9}" for c in checkpoints)
    print(f"{'Q_r':>5} {'strategy':<12} {head} {'trials to random@' + str(args.trials):>20} {'seconds':>8}")
    for r in rows:
        vals = " ".join(f"{r[f'best@{c}']:>9.3f}" for c in checkpoints)
        hit = r["trials_to_random_final"]
        print(f"{r['ratio']:>5} {r['strategy']:<12} {vals} {str(hit) if hit else '-':>20} {r['seconds']:>8.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
