"""`mpqc predict`: collect (features, measured delta_ppl) of sampled plans, fit the predictor, predict plans.

    mpqc predict collect [MODEL] --out data.csv --n-plans 40      # append one model's plans (resumable)
    mpqc predict fit data.csv [more.csv] --out predictor.json      # fit + held-out validation
    mpqc predict fit data.csv --validate sizes                     # each size's Q_r,max predicted from the others
    mpqc predict plan [MODEL] --predictor predictor.json --plan a.json --plan b.json [--measure]

The library is ``mpqc.studies.predict``; the model of the prediction and its features are described there
and in docs/scaling.md ("Prediction").
"""

from __future__ import annotations

import math
import os
import time

from mpqc.formats.spec import parse_block_size
from mpqc.io import json_safe, write_json_atomic

from . import common


def add_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="predict a plan's delta_ppl from cheap measurements (collect, fit, plan)",
        description=__doc__.split("\n\n")[0],
    )
    ps = p.add_subparsers(dest="predict_command", required=True)
    _add_collect(ps)
    _add_fit(ps)
    _add_plan(ps)


def _add_collect(ps) -> None:
    c = ps.add_parser("collect", help="measure features and delta_ppl of sampled plans of one model into a CSV")
    common.add_model_args(c, json_help="")
    c.add_argument("--out", required=True, help="the data CSV; rows of other models are kept, finished plans skipped")
    c.add_argument("--name", default=None, help="the model's label in the data (default: folder name)")
    c.add_argument("--n-plans", type=int, default=40, help="sampled plans (default 40)")
    c.add_argument("--low", default="mxint4")
    c.add_argument("--high", default="bf16")
    c.add_argument("--weights-only", action="store_true", help="activations stay at --high")
    c.add_argument("--granularity", default="matmul", choices=["matmul", "layer"])
    common.add_block_size_arg(c)
    c.add_argument(
        "--keep-high",
        default="",
        metavar="NAMES",
        help="comma-separated components or roles (e.g. lm_head) kept at --high, in no plan and left out of Q_r",
    )
    c.add_argument("--text", default=None, help="text: 'wiki' (embedded default), a .txt file or dir, hf:NAME")
    c.add_argument("--seq-len", type=int, default=128)
    c.add_argument("--calib-samples", type=int, default=4, help="calibration windows for the features (search text)")
    c.add_argument(
        "--probe-samples",
        type=int,
        default=2,
        help="of those, windows for the weight-noise forwards (0: no noise features)",
    )
    c.add_argument("--eval-samples", type=int, default=8, help="held-out windows for the measured delta_ppl")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--min-ratio", type=float, default=0.2, help="sampled Q_r lie in [min-ratio, max-ratio]")
    c.add_argument("--max-ratio", type=float, default=1.0)
    c.add_argument(
        "--guided-fraction",
        type=float,
        default=0.3,
        help="share of plans drawn around the sensitivity ranking instead of at random",
    )
    c.add_argument(
        "--search-trials",
        type=int,
        default=0,
        help="also add the trials of a sensitivity-seeded search of this many trials per --search-ratios",
    )
    c.add_argument("--search-ratios", default="0.5,0.9")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_collect)


def _add_fit(ps) -> None:
    f = ps.add_parser("fit", help="fit the predictor to collected data and validate it on held-out plans/models")
    f.add_argument("data", nargs="+", help="CSV files from `mpqc predict collect`")
    f.add_argument("--out", default="predictor.json", help="the fitted predictor (JSON)")
    f.add_argument(
        "--terms",
        default=None,
        help="comma-separated regression terms, each a feature or log(feature) "
        "(default: the predictor's DEFAULT_TERMS)",
    )
    f.add_argument("--models", default=None, help="comma-separated model labels to use (default: all)")
    f.add_argument(
        "--validate",
        default="auto",
        choices=["auto", "plans", "models", "sizes", "both", "none"],
        help="held-out plans (k-fold), leave-one-model-out, leave-one-size-out (each size's Q_r curve "
        "and Q_r,max per --budgets predicted from the other sizes), both (plans and models), or none; "
        "auto: plans and models when there are several models, else plans",
    )
    f.add_argument(
        "--budgets",
        default="0.05,0.1,0.2",
        help="loss budgets (relative delta_ppl) of --validate sizes' Q_r,max, comma-separated",
    )
    f.add_argument("-k", type=int, default=5, help="folds of the held-out-plans validation")
    f.add_argument("--seed", type=int, default=0, help="fold assignment")
    f.add_argument("--json", help="also write the fit and validation here")
    f.set_defaults(func=cmd_fit)


def _add_plan(ps) -> None:
    pl = ps.add_parser("plan", help="predict the delta_ppl of plans (and rank them)")
    common.add_model_args(pl, json_help="")
    pl.add_argument("--predictor", required=True, help="predictor JSON from `mpqc predict fit`")
    pl.add_argument("--plan", action="append", required=True, help="plan JSON (repeat to rank several)")
    pl.add_argument("--text", default=None, help="text for the calibration windows (default: wiki)")
    pl.add_argument(
        "--measure", action="store_true", help="also measure each plan's delta_ppl on the held-out windows, to compare"
    )
    pl.add_argument("--batch-size", type=int, default=8)
    pl.add_argument("--json", help="also write the predictions here")
    pl.set_defaults(func=cmd_plan)


# ---- collect ------------------------------------------------------------------------------------


def cmd_collect(args) -> int:
    from mpqc.data import load_tokens, split_tokens, text_prefix
    from mpqc.studies import predict

    for name in ("n_plans", "seq_len", "calib_samples", "eval_samples", "batch_size"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if not 0 <= args.min_ratio <= args.max_ratio <= 1:
        raise ValueError(f"need 0 <= --min-ratio <= --max-ratio <= 1, got {args.min_ratio} and {args.max_ratio}")
    ratios = tuple(float(r) for r in args.search_ratios.split(",")) if args.search_trials else ()
    existing = predict.read_data(args.out) if os.path.exists(args.out) else []
    name = args.name or (os.path.basename(os.path.normpath(args.model)) if args.model else "smollm2-135m")
    t0 = time.perf_counter()
    _, tokenizer, graph = common.load_and_capture(args.model, args.seq_len, args.device, args.dtype)
    search_tokens, holdout = split_tokens(load_tokens(tokenizer, args.text))
    n_before = len(existing)
    rows = predict.collect(
        graph,
        search_tokens,
        holdout,
        model=name,
        n_plans=args.n_plans,
        low=args.low,
        high=args.high,
        weights_only=args.weights_only,
        granularity=args.granularity,
        block_size=args.block_size,
        seq_len=args.seq_len,
        calib_samples=args.calib_samples,
        probe_samples=args.probe_samples,
        eval_samples=args.eval_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        ratio_range=(args.min_ratio, args.max_ratio),
        guided_fraction=args.guided_fraction,
        search_trials=args.search_trials,
        search_ratios=ratios,
        existing=existing,
        on_row=lambda rs: predict.write_data(args.out, rs),
        progress=not args.quiet,
        prefix=text_prefix(tokenizer),
        keep_high=_names(args.keep_high),
    )
    predict.write_data(args.out, rows)
    mine = [r for r in rows if r["model"] == name]
    new = len(rows) - n_before
    if mine:
        d = [r["delta_ppl"] for r in mine]
        print(
            f"{name}: {new} new plans ({len(mine)} in all), Q_r {min(r['ratio'] for r in mine):.2f}-"
            f"{max(r['ratio'] for r in mine):.2f}, delta_ppl {100 * min(d):+.2f}% to {100 * max(d):+.2f}%, "
            f"all-{args.high} held-out ppl {mine[0]['ppl_base']:.3f}; {time.perf_counter() - t0:.0f} s -> {args.out}"
        )
    return 0


# ---- fit ----------------------------------------------------------------------------------------

_SETTING = ("low", "high", "weights_only", "granularity", "block_size", "keep_high")


def _names(text) -> tuple[str, ...]:
    """A comma-separated list (``--keep-high``, a data row's ``keep_high``) as names; None or "": none."""
    return tuple(n.strip() for n in (text or "").split(",") if n.strip())


_MEASURE = ("seq_len", "calib_samples", "probe_samples", "seed")


def _fmt(v, pct=False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.2f}" if pct else f"{v:.3f}"


def validation_table(result: dict) -> str:
    lines = [
        "| held out | model | plans | R^2 (ln dNLL) | MAE (pp) | median rel. err | Spearman | same-Q_r pairs ordered |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    label = {"plans": "plans", "models": "model"}.get(result["by"], "size")
    for m, s in [("all", result["overall"]), *result["per_model"].items()]:
        pairs = f"{_fmt(s.get('pairs_same_ratio'))} ({s.get('n_pairs', 0)})"
        lines.append(
            f"| {label} | {m} | {s['n']} | {_fmt(s['r2_log'])} | {_fmt(s['mae'], True)} | "
            f"{_fmt(s['median_rel'])} | {_fmt(s['spearman'])} | {pairs} |"
        )
    return "\n".join(lines)


def _q_max(m: dict) -> str:
    if m["status"] == "never_reached":
        return "-"
    return f"{'>=' if m['status'] == 'above_measured' else ''}{m['value']:.3f}"


def curves_table(result: dict) -> str:
    """Measured against predicted Q_r,max per budget and the curve error, one row per held-out model."""
    budgets = result["budgets"]
    lines = [
        "| model | params | plans | curve MAE (pp) | "
        + " | ".join(f"Q_r,max at {100 * b:g}%: measured / predicted" for b in budgets)
        + " |",
        "| --- | ---: | ---: | ---: |" + " ---: |" * len(budgets),
    ]
    for c in result["curves"]:
        cells = [f"{_q_max(b['measured'])} / {_q_max(b['predicted'])}" for b in c["budgets"]]
        lines.append(
            f"| {c['model']} | {int(c['params']):,} | {c['n_plans']} | {_fmt(c['curve_mae'], True)} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def cmd_fit(args) -> int:
    from mpqc.studies import predict

    rows = [r for path in args.data for r in predict.read_data(path)]
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        have = sorted({r["model"] for r in rows})
        unknown = [m for m in wanted if m not in have]
        if unknown:
            raise ValueError(f"--models names {unknown}, which the data does not have; it has {have}")
        rows = [r for r in rows if r["model"] in wanted]
    settings = {tuple(r.get(k) for k in _SETTING) for r in rows}
    if len(settings) > 1:
        raise ValueError(
            f"the data mixes plan settings ({', '.join(_SETTING)}): "
            f"{sorted(map(str, settings))}; fit one setting at a time (--models, or separate files)"
        )
    measured = {tuple(r.get(k) for k in _MEASURE) for r in rows}
    if len(measured) > 1:
        raise ValueError(
            f"the data's features were measured differently ({', '.join(_MEASURE)}): "
            f"{sorted(map(str, measured))}; one predictor needs one way of measuring"
        )
    terms = tuple(t.strip() for t in args.terms.split(",")) if args.terms else predict.DEFAULT_TERMS
    setup = {k: rows[0].get(k) for k in _SETTING + _MEASURE + ("eval_samples",)}
    predictor = predict.Predictor.fit(rows, terms, setup=setup)
    print(predictor.describe())
    models = sorted({r["model"] for r in rows})
    modes = {
        "auto": ["plans", "models"] if len(models) > 1 else ["plans"],
        "both": ["plans", "models"],
        "none": [],
    }.get(args.validate, [args.validate])
    report = {"predictor": predictor.to_dict(), "validation": {}}
    budgets = tuple(float(b) for b in args.budgets.split(","))
    for by in modes:
        if by == "sizes":
            result = predict.leave_one_size_out(rows, terms, budgets=budgets)
        else:
            result = predict.validate(rows, terms, by=by, k=args.k, seed=args.seed)
        report["validation"][by] = {k: v for k, v in result.items() if k != "predictions"}
        what = {"plans": f"{result['k']}-fold over plans", "models": "leave one model out"}.get(
            by, "leave one size out"
        )
        print(f"\nheld-out validation ({what}):")
        print(validation_table(result))
        if by == "sizes":
            print("\neach held-out model's Q_r curve, predicted from the other sizes:")
            print(curves_table(result))
    predictor.save(args.out)
    if args.json:
        write_json_atomic(args.json, json_safe(report))
    print(f"\nwrote {args.out}" + (f", {args.json}" if args.json else ""))
    return 0


# ---- plan ---------------------------------------------------------------------------------------


def _space_of(graph, setup):
    """The plan space a predictor's data were collected in (its ``setup``)."""
    from mpqc.search.budget import Budget, SearchSpace, search_precisions

    s = setup
    low_p, high_p = search_precisions(s["low"], s["high"], weights_only=bool(s["weights_only"]))
    return SearchSpace(
        graph,
        s["granularity"],
        low_p,
        high_p,
        Budget("params", 0.0),
        parse_block_size(s["block_size"]),
        keep_high=_names(s.get("keep_high")),  # as the data was collected (none before keep_high)
    )


def cmd_plan(args) -> int:
    import mpqc
    from mpqc.data import load_tokens, split_tokens, text_prefix
    from mpqc.evaluate import nll, sample_windows
    from mpqc.studies import predict

    predictor = predict.Predictor.load(args.predictor)
    s = predictor.setup
    missing = [k for k in _SETTING + _MEASURE if k not in s and k != "keep_high"]  # none before keep_high
    if missing:
        raise ValueError(
            f"{args.predictor} does not say how its features were measured (setup lacks {missing}); "
            "fit it with `mpqc predict fit`"
        )
    texts = {}
    for path in args.plan:
        with open(path) as f:
            texts[path] = f.read()
    _, tokenizer, graph = common.load_and_capture(args.model, s["seq_len"], args.device, args.dtype)
    plans = {path: mpqc.Plan.from_file(graph, path) for path in texts}  # errors name the file
    space = _space_of(graph, s)
    search_tokens, holdout = split_tokens(load_tokens(tokenizer, args.text))
    prefix = text_prefix(tokenizer)
    calib = sample_windows(search_tokens, s["seq_len"], s["calib_samples"], s["seed"] + 1, prefix)
    needs_probe = any(predict.parse_term(t)[1] in ("noise_rise", "noise_rise_all") for t in predictor.terms)
    qmodel = mpqc.compile(graph, space.plan([]))
    t0 = time.perf_counter()
    feats = predict.Features(
        qmodel,
        space,
        calib,
        probe_samples=s["probe_samples"] if needs_probe else 0,
        batch_size=args.batch_size,
        noise_seed=s["seed"],
    )
    rows = {
        path: {**feats.features(plan, probe=needs_probe), "model": args.model or "smollm2-135m"}
        for path, plan in plans.items()
    }
    seconds = time.perf_counter() - t0
    pred = dict(zip(rows, predictor.predict(list(rows.values()))))
    measured = {}
    if args.measure:
        evals = sample_windows(holdout, s["seq_len"], s.get("eval_samples") or 8, s["seed"] + 2, prefix)
        base = nll(qmodel.set_plan(space.plan([])), windows=evals, batch_size=args.batch_size, progress=False)
        for path, plan in plans.items():
            measured[path] = math.expm1(
                nll(qmodel.set_plan(plan), windows=evals, batch_size=args.batch_size, progress=False) - base
            )
    ranked = sorted(plans, key=lambda p: pred[p])
    print(f"features of {len(plans)} plan(s) in {seconds:.1f} s; predicted delta_ppl, best first:")
    for i, path in enumerate(ranked, 1):
        r = rows[path]
        extra = f", measured {100 * measured[path]:+.2f}%" if path in measured else ""
        print(f"{i:>3}. {path}: {100 * pred[path]:+.2f}% (Q_r {r['ratio']:.3f}{extra})")
    if args.json:
        write_json_atomic(
            args.json,
            json_safe(
                {
                    "predictor": args.predictor,
                    "model": args.model or "smollm2-135m",
                    "plans": [
                        {
                            "plan": p,
                            "predicted_delta_ppl": float(pred[p]),
                            "measured_delta_ppl": measured.get(p),
                            "features": rows[p],
                        }
                        for p in ranked
                    ],
                }
            ),
        )
    return 0
