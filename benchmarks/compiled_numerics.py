"""How far a torch.compile'd (Inductor) forward's NLL lies from eager's, on SmolLM2-135M.

For uniform MXINT4 W+A and random plans at Q_r 0.9 (MXINT4 W+A vs BF16, matmul
granularity), prints eager and Inductor NLL over held-out windows and their relative
difference, with Inductor's ``emulate_precision_casts`` on (what ``qmodel.torch_compile()``
sets) and off. Plans switch without recompiling; each setting compiles once.

    python benchmarks/compiled_numerics.py [--dtype bfloat16] [--plans 3] [--n-samples 4] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import random

import torch

import mpqc
from mpqc.data import load_tokens, split_tokens, text_prefix
from mpqc.evaluate import nll, sample_windows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--plans", type=int, default=3, help="plans: uniform MXINT4, then random ones at Q_r 0.9")
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    model, tokenizer = mpqc.load_model(dtype=getattr(torch, args.dtype), device=args.device)
    graph = mpqc.capture(model, (torch.zeros(2, 64, dtype=torch.long),))
    _, holdout = split_tokens(load_tokens(tokenizer))
    windows = sample_windows(holdout, args.seq_len, args.n_samples, 0, text_prefix(tokenizer))
    names = [c.name for c in mpqc.Plan.uniform(graph, "mxint4").components]
    rng = random.Random(0)
    plans = [mpqc.Plan.uniform(graph, "mxint4")] + [
        mpqc.Plan(graph, {c: "mxint4" for c in rng.sample(names, round(0.9 * len(names)))}, default="bf16")
        for _ in range(args.plans - 1)
    ]
    qmodel = mpqc.compile(graph, plans[0])
    qmodel.add_activation_formats({p.activation_format(m) for p in plans for m in graph.matmuls})
    with torch.no_grad():
        eager = []
        for plan in plans:
            qmodel.set_plan(plan)
            eager.append(nll(qmodel, windows=windows, progress=False))
        print(f"SmolLM2-135M, {args.dtype}, {args.n_samples} x {args.seq_len} held-out tokens; NLL in nats per token")
        print(f"{'plan':<26} {'emulated casts':>14} {'eager NLL':>10} {'Inductor NLL':>13} {'relative diff':>14}")
        for emulate in (True, False):
            torch._dynamo.reset()
            fast = torch.compile(qmodel, options={"emulate_precision_casts": emulate})
            for i, plan in enumerate(plans):
                qmodel.set_plan(plan)
                got = nll(fast, windows=windows, progress=False)
                label = "uniform MXINT4 W+A" if i == 0 else f"random Q_r 0.9 #{i}"
                print(
                    f"{label:<26} {str(emulate):>14} {eager[i]:>10.5f} {got:>13.5f} {abs(got / eager[i] - 1):>14.2e}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
