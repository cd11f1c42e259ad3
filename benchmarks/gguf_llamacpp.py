"""mpqc's llama.cpp emulation against llama.cpp itself, and a searched plan against Q4_K_M, on SmolLM2-135M.

For each plan: mpqc's perplexity with llama.cpp's activation setting (``target="llama.cpp"``),
the plan exported with ``mpqc.export.to_gguf`` (from the SmolLM2 GGUF: its metadata, tokenizer
and Q8_0 token embedding kept), and that file's perplexity measured by llama.cpp
(``mpqc.export.LlamaCppLM``, xllamacpp) on the same held-out windows. Plans: the float model
(F32 matmul weights), uniform Q8_0, Q4_0 and MXFP4, llama.cpp's Q4_K_M recipe (the types
``llama-quantize ... Q4_K_M`` chooses for this model, shape fallbacks included), and a plan
searched by ``mpqc.search.run`` (low/high types, ``target="llama.cpp"``) under an average-bits
budget equal to Q4_K_M's, the tied lm_head kept at Q8_0 so that it keeps sharing the
embedding's bytes; the search scores plans on windows of the first 90% of the text, the table
on windows of the last 10%.

    python benchmarks/gguf_llamacpp.py [--windows 4] [--seq-len 512] [--trials 10] [--low q4_k,q5_0 --high q6_k,q8_0] [--torch-threads 1]
        [--plan-file searched.json] [--paired-windows 64] [--out benchmarks/results/gguf_llamacpp.json]

``--paired-windows N`` compares the Q4_K_M and searched files on N more held-out windows in
llama.cpp: the perplexity ratio (searched / Q4_K_M) with a 95% bootstrap interval over windows.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

import mpqc
from mpqc.data import load_tokens, split_tokens, text_prefix
from mpqc.evaluate import perplexity, sample_windows
from mpqc.export import LlamaCppLM, to_gguf
from mpqc.export.gguf import q4_k_m_plan
from mpqc.io import write_json_atomic
from mpqc.models import smollm2_gguf_path


def measure(label, qmodel, plan, windows, source, workdir, threads):
    qmodel.set_plan(plan)
    t0 = time.perf_counter()
    emulated = perplexity(qmodel, windows=windows, batch_size=1, progress=False)
    t1 = time.perf_counter()
    path = os.path.join(workdir, f"{label}.gguf")
    result = to_gguf(qmodel, path, source=source)
    t2 = time.perf_counter()
    measured = LlamaCppLM(path, threads=threads).perplexity(windows=windows)
    t3 = time.perf_counter()
    row = {
        "plan": label,
        "average_bits": plan.average_bits(),
        "file_mib": result.bytes / 2**20,
        "mpqc_emulated": emulated,
        "llamacpp": measured,
        "difference_percent": 100 * (measured / emulated - 1),
        "seconds": {"mpqc": t1 - t0, "export": t2 - t1, "llamacpp": t3 - t2},
    }
    print(json.dumps(row), flush=True)
    return row


def searched_plan(graph, qmodel, train, prefix, bits, args):
    t0 = time.perf_counter()
    result = mpqc.search.run(
        graph,
        train,
        budget=("bits", bits),
        low=args.low,
        high=args.high,
        target="llama.cpp",
        keep_high=("lm_head",),
        n_trials=args.trials,
        seq_len=args.search_seq_len,
        n_samples=args.search_windows,
        batch_size=1,
        prefix=prefix,
        seed=0,
        qmodel=qmodel,
        progress=False,
    )
    print(
        f"search: {time.perf_counter() - t0:.0f} s, best search-window perplexity {result.perplexity:.3f}", flush=True
    )
    return result.plan


def paired(workdir, labels, holdout, args, prefix):
    """The two plans' llama.cpp NLL on the same ``--paired-windows`` held-out windows: the
    perplexity ratio with a 95% bootstrap interval over windows, and how many windows each wins."""
    import numpy as np

    windows = sample_windows(holdout, args.seq_len, args.paired_windows, args.paired_seed, prefix)
    a, b = (
        LlamaCppLM(os.path.join(workdir, f"{label}.gguf"), threads=args.threads).window_nll(windows).numpy()
        for label in labels
    )
    tokens = windows.shape[1] - 1
    ratio = lambda idx: float(np.exp((b[idx].sum() - a[idx].sum()) / (len(idx) * tokens)))  # noqa: E731
    rng = np.random.default_rng(0)
    boot = [ratio(rng.integers(0, len(a), len(a))) for _ in range(2000)]
    out = {
        "plans": list(labels),
        "windows": len(a),
        "seq_len": args.seq_len,
        "seed": args.paired_seed,
        "perplexity": [float(np.exp(x.sum() / (len(x) * tokens))) for x in (a, b)],
        "ratio": ratio(np.arange(len(a))),
        "ratio_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "windows_second_lower": int((b < a).sum()),
    }
    print(json.dumps({"paired": out}), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=4, help="held-out windows of --seq-len tokens")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--search-windows", type=int, default=4)
    ap.add_argument("--search-seq-len", type=int, default=256)
    ap.add_argument("--low", default="q4_k,q5_0", help="preference list: q4_k where rows are whole 256-blocks")
    ap.add_argument("--high", default="q6_k,q8_0")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's threads")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch's (1 is fastest on a busy 2-core machine)")
    ap.add_argument("--plans", default="fp32,q8_0,q4_0,mxfp4,q4_k_m,searched")
    ap.add_argument("--plan-file", help="a plan JSON to measure as 'searched' instead of searching")
    ap.add_argument(
        "--paired-windows", type=int, default=0, help="compare q4_k_m and searched on this many more windows"
    )
    ap.add_argument("--paired-seed", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/gguf_llamacpp.json")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)

    model, tokenizer = mpqc.load_model()
    graph = mpqc.capture(model, (torch.zeros(2, 64, dtype=torch.long),))
    prefix = text_prefix(tokenizer)
    train, holdout = split_tokens(load_tokens(tokenizer))
    windows = sample_windows(holdout, args.seq_len, args.windows, 0, prefix)
    source = smollm2_gguf_path()
    q4km = q4_k_m_plan(graph)
    plans = {
        "fp32": lambda: mpqc.Plan.uniform(graph, "fp32", target="llama.cpp"),
        "q8_0": lambda: mpqc.Plan.uniform(graph, "q8_0", target="llama.cpp"),
        "q4_0": lambda: mpqc.Plan.uniform(graph, "q4_0", target="llama.cpp").replace({"lm_head": "q8_0"}),
        "mxfp4": lambda: mpqc.Plan.uniform(graph, "mxfp4", target="llama.cpp").replace({"lm_head": "q8_0"}),
        "q4_k_m": lambda: q4km,
    }
    qmodel = mpqc.compile(graph, q4km)
    if args.plan_file:
        plans["searched"] = lambda: mpqc.Plan.from_file(graph, args.plan_file)
    else:
        plans["searched"] = lambda: searched_plan(graph, qmodel, train, prefix, q4km.average_bits(), args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mpqc-gguf-bench-") as workdir:
        for label in args.plans.split(","):
            plan = plans[label]()
            rows.append(measure(label, qmodel, plan, windows, source, workdir, args.threads))
            if label == "searched":
                rows[-1]["plan_json"] = json.loads(plan.to_json())
        compared = None
        if args.paired_windows:
            compared = paired(workdir, ("q4_k_m", "searched"), holdout, args, prefix)
    result = {"windows": args.windows, "seq_len": args.seq_len, "rows": rows, "args": vars(args)}
    write_json_atomic(args.out, result | ({"paired": compared} if compared else {}))
    print("| plan | avg bits | file MiB | mpqc emulated | llama.cpp | difference |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['plan']} | {r['average_bits']:.3f} | {r['file_mib']:.2f} | {r['mpqc_emulated']:.3f} | "
            f"{r['llamacpp']:.3f} | {r['difference_percent']:+.2f}% |"
        )


if __name__ == "__main__":
    main()
