"""mpqc compile: compile with a plan, report held-out perplexity before and after."""

from __future__ import annotations

import json
import time

from mpqc.io import write_json_atomic

from . import common, validate


def add_parser(sub) -> None:
    parser = sub.add_parser("compile", help="compile with a plan and report perplexity before and after")
    common.add_model_args(parser)
    common.add_plan_args(parser)
    parser.add_argument("--text", default=None, help="text: 'wiki' (embedded default), a .txt file or dir, hf:NAME")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args) -> int:
    import mpqc

    for flag in ("seq_len", "n_samples", "batch_size"):
        validate.positive_int("--" + flag.replace("_", "-"), getattr(args, flag))
    # The windows are checked against the text (report on text the search never sees) before the model loads.
    holdout, prefix = validate.holdout_text(args, mpqc.models.load_tokenizer(args.model))
    _, tokenizer, graph = common.load_and_capture(args.model, args.seq_len, args.device, args.dtype)
    plan = common.plan_from_args(graph, args)
    kw = dict(seq_len=args.seq_len, n_samples=args.n_samples, batch_size=args.batch_size, seed=args.seed, prefix=prefix)
    qmodel = mpqc.compile(graph, mpqc.Plan.uniform(graph, "fp32"))
    base, t_base = _timed(lambda: mpqc.evaluate.perplexity(qmodel, holdout, **kw))
    qmodel.set_plan(plan)
    quant, t_quant = _timed(lambda: mpqc.evaluate.perplexity(qmodel, holdout, **kw))
    result = {
        "model": args.model or "smollm2-135m",
        "model_class": graph.model_class,
        "text": args.text or "wiki",
        "evaluation": {**kw, "tokens": "holdout (last 10%)"},
        "plan": json.loads(plan.to_json()),
        "perplexity_fp32": base,
        "perplexity_quantized": quant,
        "delta_ppl": (quant - base) / base,
        "seconds": {"fp32": t_base, "quantized": t_quant},
    }
    s = plan.summary()
    print(f"plan: {plan}")
    print(
        f"quantization ratio (params) {s['quantization_ratio_params']:.3f}, (MACs) {s['quantization_ratio_macs']:.3f}, "
        f"average bits per weight {s['average_bits']:.3f}"
    )
    print(
        f"perplexity unquantized ({graph.dtype}) {base:.3f} -> quantized {quant:.3f} "
        f"(delta {100 * result['delta_ppl']:+.2f}%) on {args.n_samples} x {args.seq_len} held-out tokens"
    )
    if args.json:
        write_json_atomic(args.json, result)
    return 0


def _timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0
