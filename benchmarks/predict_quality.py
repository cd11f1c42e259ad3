"""How well `mpqc predict` predicts and ranks plans: held-out plans on SmolLM2-135M and on the toy
family, leave-one-model-out across the family, and SmolLM2 predicted from the family alone.

    python examples/train_family.py --out runs/family                       # the toy family (docs/scaling.md)
    python examples/train_family.py --out runs/family --seed 10 \\
        --sizes llama-xsm:24:2:2,llama-sm:48:2:4,llama-ml:96:3:4              # three sizes in between
    python benchmarks/predict_quality.py --collect                           # collect what is missing, then the tables

``--collect`` runs, for what the CSVs lack (each resumable):

    mpqc predict collect --out runs/predict/smollm2.csv --n-plans 50 --search-trials 6
    OMP_NUM_THREADS=1 mpqc predict collect runs/family/NAME --out runs/predict/family.csv \\
        --n-plans 60 --eval-samples 32 --search-trials 6                      # for each family member

Prints Markdown tables (the ones in docs/scaling.md, "Prediction") and writes them as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np

from mpqc.studies import predict

FAMILY = ("llama-xs", "llama-xsm", "llama-s", "llama-sm", "llama-m", "llama-ml", "llama-l")
# name -> (terms, needs a forward per plan)
TERM_SETS = {
    "Q_r only (baseline)": (["log(ratio)"], False),
    "Fisher sum (the default)": (["log(fisher_diag)"], False),
    "Fisher sum + Q_r": (["log(fisher_diag)", "log(ratio)"], False),
    "joint Fisher": (["log(fisher)"], False),
    "weight-noise energy": (["log(weight_noise)"], False),
    "noise probe": (["log(noise_rise)"], True),
    "Fisher sum + noise probe": (["log(fisher_diag)", "log(noise_rise)"], True),
    "Fisher sum + model factors": (["log(fisher_diag)", "nll_base", "log(params)", "log(noise_rise_all)"], False),
}


def collect(args) -> None:
    have = {r["model"] for r in predict.read_data(args.smollm2)} if os.path.exists(args.smollm2) else set()
    if "smollm2-135m" not in have or args.resume:
        subprocess.run(
            ["mpqc", "predict", "collect", "--out", args.smollm2, "--n-plans", "50", "--search-trials", "6", "--quiet"],
            check=True,
        )
    have = {r["model"] for r in predict.read_data(args.family)} if os.path.exists(args.family) else set()
    for name in FAMILY:
        path = os.path.join(args.family_dir, name)
        if not os.path.isdir(path):
            print(f"skipping {name}: {path} is not there (train it, see the docstring)", file=sys.stderr)
            continue
        if name not in have or args.resume:
            subprocess.run(
                [
                    "mpqc",
                    "predict",
                    "collect",
                    path,
                    "--out",
                    args.family,
                    "--n-plans",
                    "60",
                    "--eval-samples",
                    "32",
                    "--search-trials",
                    "6",
                    "--quiet",
                ],
                check=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )


def _f(v, pct=False):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.2f}"


HEADER = (
    "| predictor | forward per plan | R² (ln ΔNLL) | MAE (pp of ppl) | median rel. err | Spearman | "
    "same-Q_r pairs ordered |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |"
)


def row(name, probe, m):
    return (
        f"| {name} | {'yes' if probe else 'no'} | {_f(m['r2_log'])} | {_f(m['mae'], True)} | {_f(m['median_rel'])} | "
        f"{_f(m['spearman'])} | {_f(m.get('pairs_same_ratio'))} ({m.get('n_pairs', 0)}) |"
    )


def cross(train, test, terms):
    """Fit on ``train`` rows, score on ``test`` rows."""
    p = predict.Predictor.fit(train, terms)
    pred = p.predict(test)
    true = [r["delta_ppl"] for r in test]
    return predict.metrics(true, pred, ratios=[r["ratio"] for r in test], models=[r["model"] for r in test])


def timing(n: int) -> dict:
    """Seconds on SmolLM2-135M (the collection's settings): the per-model measurements once, then per
    plan the features without and with the noise probe, and one evaluation (8 x 128 held-out tokens)."""
    import time

    import torch

    import mpqc
    from mpqc.data import load_tokens, split_tokens
    from mpqc.evaluate import nll, sample_windows
    from mpqc.search.budget import Budget, SearchSpace, search_precisions

    model, tokenizer = mpqc.load_model()
    graph = mpqc.capture(model, (torch.zeros(2, 64, dtype=torch.long),))
    search, holdout = split_tokens(load_tokens(tokenizer))
    low, high = search_precisions("mxint4", "bf16", weights_only=False)
    space = SearchSpace(graph, "matmul", low, high, Budget("params", 0.0))
    qmodel = mpqc.compile(graph, space.plan([]))
    calib, evals = sample_windows(search, 128, 4, 1), sample_windows(holdout, 128, 8, 2)
    t0 = time.perf_counter()
    feats = predict.Features(qmodel, space, calib, probe_samples=2)
    t_model = time.perf_counter() - t0
    plans = [p["low"] for p in predict.sample_plans(space, n, seed=123, sensitivity=feats.sensitivity)]
    t0 = time.perf_counter()
    for low_names in plans:
        feats.features(low_names, probe=False)
    t_dot = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for low_names in plans:
        feats.features(low_names, probe=True)
    t_probe = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for low_names in plans:
        nll(qmodel.set_plan(space.plan(low_names)), windows=evals, progress=False)
    t_eval = (time.perf_counter() - t0) / n
    result = {
        "per_model_seconds": t_model,
        "features_seconds": t_dot,
        "features_with_probe_seconds": t_probe,
        "evaluation_seconds": t_eval,
        "plans": n,
        "threads": torch.get_num_threads(),
    }
    print(f"\n## Cost on SmolLM2-135M ({n} plans, {torch.get_num_threads()} threads)\n")
    print(
        "| per model, once (NLL, Fisher gradients on 4 x 128, weight noise) | per plan: features | "
        "per plan: features + noise probe (2 x 128) | per plan: evaluation (8 x 128) |"
    )
    print("| ---: | ---: | ---: | ---: |")
    print(f"| {t_model:.1f} s | {1000 * t_dot:.1f} ms | {t_probe:.2f} s | {t_eval:.2f} s |")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", default="runs/predict/smollm2.csv")
    ap.add_argument("--family", default="runs/predict/family.csv")
    ap.add_argument("--family-dir", default="runs/family")
    ap.add_argument("--collect", action="store_true", help="collect the data the CSVs lack first")
    ap.add_argument(
        "--resume", action="store_true", help="with --collect: run every collection (finishes partial ones)"
    )
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument(
        "--timing",
        type=int,
        default=0,
        metavar="N",
        help="also time the features and the evaluation of N plans on SmolLM2 (alone on the machine)",
    )
    ap.add_argument("--json", default="runs/predict/quality.json")
    args = ap.parse_args(argv)
    if args.collect:
        collect(args)
    smol = predict.read_data(args.smollm2)
    fam = predict.read_data(args.family)
    out = {"smollm2_plans": {}, "family_plans": {}, "family_models": {}, "smollm2_from_family": {}, "per_model": {}}

    def n_plans(rows):
        return f"{len(rows)} plans of {len({r['model'] for r in rows})} model(s)"

    print(f"## SmolLM2-135M, held-out plans ({args.k}-fold; {n_plans(smol)})\n\n{HEADER}")
    for name, (terms, probe) in TERM_SETS.items():
        m = predict.validate(smol, terms, by="plans", k=args.k)["overall"]
        out["smollm2_plans"][name] = m
        print(row(name, probe, m))

    print(f"\n## Toy family, held-out plans ({args.k}-fold over the pooled plans; {n_plans(fam)})\n\n{HEADER}")
    for name, (terms, probe) in TERM_SETS.items():
        m = predict.validate(fam, terms, by="plans", k=args.k)["overall"]
        out["family_plans"][name] = m
        print(row(name, probe, m))

    print(f"\n## Toy family, leave one model out (pooled over the held-out models)\n\n{HEADER}")
    per_model = {}
    for name, (terms, probe) in TERM_SETS.items():
        v = predict.validate(fam, terms, by="models")
        out["family_models"][name] = v["overall"]
        per_model[name] = v["per_model"]
        print(row(name, probe, v["overall"]))

    print(f"\n## SmolLM2-135M predicted from the toy family alone (fit on {n_plans(fam)})\n\n{HEADER}")
    for name, (terms, probe) in TERM_SETS.items():
        m = cross(fam, smol, terms)
        out["smollm2_from_family"][name] = m
        print(row(name, probe, m))

    print(f"\n## SmolLM2-135M, held-out plans ({args.k}-fold), by where the plans came from\n")
    print(
        "| predictor | plans | R² (ln ΔNLL) | Spearman | same-Q_r pairs ordered |\n| --- | --- | ---: | ---: | ---: |"
    )
    true = np.array([r["delta_ppl"] for r in smol])
    for name in ("Q_r only (baseline)", "Fisher sum (the default)", "Fisher sum + Q_r", "noise probe"):
        pred = np.array(predict.validate(smol, TERM_SETS[name][0], by="plans", k=args.k)["predictions"])
        for source in ("random", "guided", "search"):
            idx = [i for i, r in enumerate(smol) if r["source"] == source]
            m = predict.metrics(true[idx], pred[idx], ratios=[smol[i]["ratio"] for i in idx])
            out.setdefault("smollm2_by_source", {}).setdefault(name, {})[source] = m
            print(
                f"| {name} | {source} ({len(idx)}) | {_f(m['r2_log'])} | {_f(m['spearman'])} | "
                f"{_f(m.get('pairs_same_ratio'))} ({m.get('n_pairs', 0)}) |"
            )

    focus = "Fisher sum (the default)"
    print(f"\n## Per held-out model, leave one model out, predictor '{focus}'\n")
    print(
        "| held-out model | params | plans | delta_ppl measured | R² (ln ΔNLL) | MAE (pp) | Spearman | same-Q_r pairs |"
    )
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    by_model = {r["model"]: [] for r in fam}
    for r in fam:
        by_model[r["model"]].append(r)
    for model, rows in sorted(by_model.items(), key=lambda kv: kv[1][0]["params"]):
        m = per_model[focus][model]
        d = [r["delta_ppl"] for r in rows]
        out["per_model"][model] = m
        print(
            f"| {model} | {rows[0]['params']:,} | {len(rows)} | {100 * min(d):+.1f}% to {100 * max(d):+.1f}% | "
            f"{_f(m['r2_log'])} | {_f(m['mae'], True)} | {_f(m['spearman'])} | {_f(m.get('pairs_same_ratio'))} "
            f"({m.get('n_pairs', 0)}) |"
        )

    if args.timing:
        out["timing"] = timing(args.timing)
    if args.json:
        from mpqc.io import json_safe, write_json_atomic

        write_json_atomic(args.json, json_safe(json.loads(json.dumps(out, default=float))))
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
