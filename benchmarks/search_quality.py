"""What each search strategy buys on the real SmolLM2-135M, judged on held-out text.

For each setting (matmul Q_r 0.5, 0.9, 0.95 and layer Q_r 0.5 by default; MXINT4 weights and
activations against BF16), runs the one-shot ``knapsack`` plan (one evaluation), random search
(the paper's method), TPE and the default ``refine`` strategy on the same search windows, and
reports each chosen plan's perplexity on held-out windows the searches never saw, its
delta_ppl over the all-BF16 model on those windows, and what the search cost in full
evaluations of its windows (pruned trials' partial evaluations, the Fisher passes, the
re-scoring included); against the knapsack, a 95% interval by a paired bootstrap over the
held-out windows, where both rows carry their per-window NLLs. Results are appended to --json as each run finishes, and a rerun skips
the runs already there.

    python benchmarks/search_quality.py [--settings matmul:0.5,matmul:0.9,matmul:0.95,layer:0.5]
        [--strategies knapsack,random,tpe,refine] [--trials 50] [--max-cost 50] [--holdout-windows 64]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import search_setup

import mpqc
from mpqc.io import write_json_atomic
from mpqc.search.budget import SearchSpace, search_precisions


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="matmul:0.5,matmul:0.9,matmul:0.95,layer:0.5")
    ap.add_argument("--strategies", default="knapsack,random,tpe,refine")
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--holdout-windows", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="search_quality.json")
    ap.add_argument(
        "--max-cost", type=float, default=50.0, help="cap on each search's full evaluations (the target's 50; 0: none)"
    )
    ap.add_argument(
        "--score-contenders", action="store_true", help="also the held-out perplexity of every re-scored contender"
    )
    return ap.parse_args()


def search_config(strategy: str, granularity: str, ratio: float, args, prefix):
    # knapsack: one evaluation of the integer program's plan; the others: n trials, and each
    # search names its plan the way `mpqc search` does (pruning and re-scoring where it applies).
    return mpqc.search.SearchConfig(
        budget=("params", ratio),
        granularity=granularity,
        sampler=strategy,
        n_trials=1 if strategy == "knapsack" else args.trials,
        seq_len=args.seq_len,
        n_samples=args.n_samples,
        seed=args.seed,
        prefix=prefix,
        baselines=False,
        max_cost=None if strategy == "knapsack" or not args.max_cost else args.max_cost,
    )


def run_one(bench: search_setup.Bench, holdout_windows, strategy, granularity, ratio, args) -> dict:
    graph, qmodel = bench.graph, bench.qmodel
    t0 = time.perf_counter()
    config = search_config(strategy, granularity, ratio, args, bench.prefix)
    result = mpqc.search.run(graph, bench.search_tokens, config, qmodel=qmodel, progress=False)
    seconds = time.perf_counter() - t0
    if args.score_contenders and result.decided:  # how the fresh windows' verdicts hold out
        low_p, high_p = search_precisions("mxint4", "bf16", weights_only=False)
        space = SearchSpace(graph, granularity, low_p, high_p, mpqc.search.Budget("params", ratio))
        for row in result.decided["contenders"]:
            qmodel.set_plan(space.plan(result.study.trials[row["trial"]].user_attrs["low"]))
            row["holdout_perplexity"] = mpqc.evaluate.perplexity(qmodel, windows=holdout_windows, progress=False)
    qmodel.set_plan(result.plan)
    per_window = mpqc.evaluate.window_nlls(qmodel, holdout_windows)  # one evaluation gives both
    held_out = mpqc.evaluate.perplexity_of(float(per_window.mean()))
    states = [t.state.name for t in result.study.trials]
    return {
        "granularity": granularity,
        "ratio": ratio,
        "strategy": strategy,
        "achieved": result.achieved,
        "search_perplexity": result.perplexity,
        "holdout_perplexity": held_out,
        "cost": result.cost,
        "notes": result.notes,  # whether max_cost stopped it before its trials
        "complete": states.count("COMPLETE"),
        "pruned": states.count("PRUNED"),
        "decided_windows": result.decided["windows"] if result.decided else args.n_samples,
        "decided": result.decided,  # every contender's fresh-window numbers, the reference, the winner
        "seconds": seconds,
        # the matmuls it sends low, to evaluate the plan again without searching
        "low_matmuls": sorted(m.name for m in graph.matmuls if result.plan.precision_of(m).weight.name == "mxint4"),
        "holdout_window_nlls": per_window.tolist(),
    }


def table(rows, base: float) -> str:
    lines = [
        f"{'setting':<14} {'strategy':<9} {'Q_r':>6} {'held-out ppl':>12} {'delta_ppl':>10} {'cost':>6} "
        f"{'pruned':>6} {'decided on':>10}"
    ]
    for r in rows:
        delta = r["holdout_perplexity"] / base - 1
        lines.append(
            f"{r['granularity'] + ' ' + str(r['ratio']):<14} {r['strategy']:<9} {r['achieved']:>6.3f} "
            f"{r['holdout_perplexity']:>12.3f} {100 * delta:>9.1f}% {r['cost']['total']:>6.1f} "
            f"{r['pruned']:>6} {r['decided_windows']:>10}"
        )
    return "\n".join(lines)


def verdict(rows, base: float, base_nlls=None) -> list[str]:
    out = []
    for setting in sorted({(r["granularity"], r["ratio"]) for r in rows}):
        by = {
            r["strategy"]: r["holdout_perplexity"] / base - 1 for r in rows if (r["granularity"], r["ratio"]) == setting
        }
        if {"refine", "knapsack"} <= set(by):
            gain = 1 - by["refine"] / by["knapsack"]
            rows_of = {r["strategy"]: r for r in rows if (r["granularity"], r["ratio"]) == setting}
            line = (
                f"{setting[0]} {setting[1]}: refine delta_ppl {100 * gain:+.1f}% lower than knapsack's "
                f"{_interval(rows_of['refine'], rows_of['knapsack'], base_nlls)}(target >= 20%)"
            )
            if "random" in by:
                line += f", {100 * (1 - by['refine'] / by['random']):+.1f}% lower than random's"
            out.append(line)
    return out


def _interval(a: dict, b: dict, base_nlls, n: int = 2000) -> str:
    """The 95% interval of how much lower a's held-out delta_ppl is than b's, by a paired
    bootstrap over the held-out windows (the same resample for both plans and the all-BF16
    model); empty where a row has no per-window NLLs."""
    if base_nlls is None or "holdout_window_nlls" not in a or "holdout_window_nlls" not in b:
        return ""
    nll = np.array([a["holdout_window_nlls"], b["holdout_window_nlls"], base_nlls])
    rng = np.random.default_rng(0)
    picks = rng.integers(0, nll.shape[1], size=(n, nll.shape[1]))
    ppl = np.exp(nll[:, picks].mean(axis=2))  # [3, n]
    gain = 1 - (ppl[0] / ppl[2] - 1) / (ppl[1] / ppl[2] - 1)
    lo, hi = np.percentile(gain, [2.5, 97.5])
    return f"[95% {100 * lo:+.1f}, {100 * hi:+.1f}] "


def main():
    args = parse_args()
    bench = search_setup.load(args.seed, args.seq_len)
    graph, qmodel = bench.graph, bench.qmodel
    holdout_windows = bench.held_out(args.holdout_windows)
    done = json.load(open(args.json)) if os.path.exists(args.json) else {"rows": []}
    if "base" not in done:
        done["base"] = mpqc.evaluate.perplexity(qmodel, windows=holdout_windows, progress=False)
    if "base_window_nlls" not in done:
        qmodel.set_plan(mpqc.Plan.uniform(graph, "bf16"))
        done["base_window_nlls"] = mpqc.evaluate.window_nlls(qmodel, holdout_windows).tolist()
    have = {(r["granularity"], r["ratio"], r["strategy"]) for r in done["rows"]}
    for setting in args.settings.split(","):
        granularity, ratio = setting.split(":")[0], float(setting.split(":")[1])
        for strategy in args.strategies.split(","):
            if (granularity, ratio, strategy) in have:
                continue
            row = run_one(bench, holdout_windows, strategy, granularity, ratio, args)
            done["rows"].append(row)
            write_json_atomic(args.json, done)
            print(
                f"{granularity} {ratio} {strategy}: held-out {row['holdout_perplexity']:.3f}, cost "
                f"{row['cost']['total']:.1f}, {row['seconds']:.0f} s",
                flush=True,
            )
    print(
        f"\nSmolLM2-135M, MXINT4 W+A vs BF16; search on {args.n_samples} x {args.seq_len} tokens, seed {args.seed}; "
        f"held-out: {args.holdout_windows} x {args.seq_len} tokens, all-BF16 perplexity {done['base']:.3f}"
    )
    print(table(done["rows"], done["base"]))
    print("\n".join(verdict(done["rows"], done["base"], done.get("base_window_nlls"))))


if __name__ == "__main__":
    main()
