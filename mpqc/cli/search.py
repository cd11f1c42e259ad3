"""mpqc search: the best plan under a quantization-ratio or bits budget; writes plan and trials."""

from __future__ import annotations

import time

from . import common, validate

RESCORE_CONFIDENCE_HELP = (
    "e.g. 0.95: a contender replaces the one-shot start plan only if better on the fresh windows at "
    "this paired one-sided confidence (default 0: the least perplexity wins)"
)

MAX_COST_HELP = (
    "the most full evaluations of the search windows to spend, Fisher pass, pruned trials and re-scoring "
    "included: the search stops early rather than pass it (default: no cap)"
)


def add_parser(sub) -> None:
    s = sub.add_parser("search", help="search the best plan under a quantization-ratio or bits budget")
    common.add_model_args(s)
    s.add_argument("--ratio", type=float, default=0.9, help="Q_r budget: share of matmul parameters in low precision")
    s.add_argument("--by-macs", action="store_true", help="the ratio counts MACs instead of parameters")
    s.add_argument("--bits", type=float, default=None, help="instead of a ratio: average bits per weight at most this")
    s.add_argument("--granularity", default="matmul", choices=["matmul", "layer"])
    s.add_argument(
        "--low",
        default="mxint4",
        help="a format, or a comma-separated preference list: each component takes the first that stores its "
        "weight rows (q4_k,q5_0: q4_k where rows are whole 256-blocks, else q5_0)",
    )
    s.add_argument("--high", default="bf16", help="a format, or a preference list as for --low (q6_k,q8_0)")
    s.add_argument("--weights-only", action="store_true", help="activations stay at --high")
    s.add_argument(
        "--target",
        default=None,
        choices=["llama.cpp"],
        help="score plans as this runtime runs them: llama.cpp turns activations into Q8_0/Q8_K/fp16 "
        "per weight type (then --low/--high need GGUF types such as q4_0, q4_k, q8_0, mxfp4)",
    )
    common.add_block_size_arg(s)
    s.add_argument(
        "--sampler",
        default="refine",
        help="refine (default: the knapsack plan refined with measured losses), knapsack (one evaluation), "
        "sensitivity, random, tpe, cmaes, gp, qmc, nsga2, or package.module:Class",
    )
    s.add_argument("--sampler-kwargs", default=None, help="JSON keyword arguments for the sampler")
    s.add_argument("--n-trials", type=int, default=12)
    s.add_argument(
        "--torch-compile",
        action="store_true",
        help="evaluate trials through torch.compile: one compile for the whole search, then faster trials",
    )
    s.add_argument(
        "--paper",
        action="store_true",
        help="the paper's setting: random, 50 trials, 1024 sequences, no pruning or re-scoring, every matmul searched",
    )
    s.add_argument("--no-prune", action="store_true", help="score every trial on all its windows")
    s.add_argument("--rescore", type=int, default=3, help="re-score this many best plans on more windows (0: off)")
    s.add_argument("--rescore-confidence", type=float, default=0.0, help=RESCORE_CONFIDENCE_HELP)
    s.add_argument("--max-cost", type=float, default=None, help=MAX_COST_HELP)
    s.add_argument(
        "--keep-high",
        default="",
        metavar="NAMES",
        help="comma-separated components or roles (e.g. lm_head) kept at --high, not searched and left out of Q_r",
    )
    s.add_argument(
        "--search-dominated",
        action="store_true",
        help="also search components that cannot pay for the budget (attention matmuls under a parameter budget)",
    )
    s.add_argument("--text", default=None)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--n-samples", type=int, default=8)
    s.add_argument(
        "--holdout-samples",
        type=int,
        default=None,
        help="windows of the held-out report (default: --n-samples, or as many as the held-out text holds)",
    )
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--sampler-seed",
        type=int,
        default=None,
        help="the sampler's seed (default --seed); each further worker or restart of a stored study adds 1",
    )
    s.add_argument("--storage", default=None, help="SQLite file or database URL: resumable, shareable by workers")
    s.add_argument("--study-name", default=None)
    s.add_argument("--out", default="mpqc-search", help="directory for best_plan.json, trials.csv, result.json")
    _add_lm_eval_args(s)
    s.set_defaults(func=run)


def _add_lm_eval_args(s) -> None:
    s.add_argument(
        "--lm-eval-task",
        default=None,
        metavar="NAME_OR_YAML",
        help="objective: an lm-eval-harness task's metric instead of perplexity (a task name such as "
        "mmlu, or a task YAML); needs `pip install lm_eval`",
    )
    s.add_argument(
        "--lm-eval-include",
        action="append",
        default=None,
        metavar="DIR",
        help="a directory of custom lm-eval task YAMLs (repeatable)",
    )
    s.add_argument(
        "--lm-eval-limit",
        type=float,
        default=None,
        metavar="N",
        help="score the first N documents of each task (a fraction if below 1); default all",
    )
    s.add_argument(
        "--lm-eval-metric", default=None, help="the task's metric to optimize, e.g. acc (default: its first)"
    )
    s.add_argument("--lm-eval-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")


def _budget(args) -> tuple[str, float]:
    if args.bits is not None:
        return ("bits", args.bits)
    return ("macs" if args.by_macs else "params", args.ratio)


def _check_lm_eval(args) -> None:
    """Fail on lm-eval settings before the model loads, not after."""
    if args.lm_eval_task is not None:
        from mpqc.search import lm_eval_adapter

        try:
            lm_eval_adapter.require_lm_eval()
        except ImportError as e:
            raise ValueError(f"--lm-eval-task: {e}") from None
        lm_eval_adapter.resolve_task(args.lm_eval_task, args.lm_eval_include)
    elif (
        args.lm_eval_include
        or args.lm_eval_limit is not None
        or args.lm_eval_metric
        or args.lm_eval_fewshot is not None
    ):
        raise ValueError("--lm-eval-include/--lm-eval-limit/--lm-eval-metric/--lm-eval-fewshot need --lm-eval-task")


def _objective(args, tokenizer):
    if args.lm_eval_task is None:
        return None
    from mpqc.search import lm_eval_adapter

    limit = args.lm_eval_limit
    limit = int(limit) if limit is not None and limit >= 1 and float(limit).is_integer() else limit
    return lm_eval_adapter.LMEvalObjective(
        task=args.lm_eval_task,
        tokenizer=tokenizer,
        metric=args.lm_eval_metric,
        limit=limit,
        include_path=args.lm_eval_include,
        num_fewshot=args.lm_eval_fewshot,
        seed=args.seed,
        batch_size=args.batch_size,
    )


def _config(args, sampler_kwargs, prefix):
    from mpqc.search import SearchConfig

    return SearchConfig(
        budget=_budget(args),
        granularity=args.granularity,
        low=args.low,
        high=args.high,
        weights_only=args.weights_only,
        sampler=args.sampler,
        sampler_kwargs=sampler_kwargs,
        n_trials=args.n_trials,
        seq_len=args.seq_len,
        n_samples=args.n_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        sampler_seed=args.sampler_seed,
        storage=args.storage,
        study_name=args.study_name,
        block_size=args.block_size,
        torch_compile=args.torch_compile,
        prefix=prefix,
        pruner=None if args.no_prune else "incumbent",
        rescore=args.rescore,
        rescore_confidence=args.rescore_confidence or None,
        max_cost=args.max_cost,
        search_dominated=args.search_dominated,
        target=args.target,
        keep_high=tuple(n.strip() for n in args.keep_high.split(",") if n.strip()),
    )


def run(args) -> int:
    import mpqc
    from mpqc.io import write_json_atomic
    from mpqc.search import PAPER_SETTING, write_outputs

    if args.paper:
        args.sampler, args.n_trials, args.n_samples = (PAPER_SETTING[k] for k in ("sampler", "n_trials", "n_samples"))
        args.no_prune, args.rescore, args.search_dominated, args.max_cost = True, 0, True, None
    sampler_kwargs = validate.sampler_kwargs(args.sampler_kwargs)
    _check_lm_eval(args)
    config = _config(args, sampler_kwargs, ())
    validate.search_settings(config, args)  # before anything loads: formats, sampler, storage ...
    tokenizer = mpqc.models.load_tokenizer(args.model)  # seconds; the model takes a minute
    search_tokens, holdout, prefix = validate.search_text(args, tokenizer, config)
    _, tokenizer, graph = common.load_and_capture(args.model, args.seq_len, args.device, args.dtype)
    objective = _objective(args, tokenizer)
    t0 = time.perf_counter()
    result = mpqc.search.run(graph, search_tokens, config.replace(prefix=prefix), objective=objective)
    seconds = time.perf_counter() - t0
    _report_holdout(result, graph, holdout, objective, args, prefix)
    result.holdout["n_samples"] = args.holdout_samples
    paths = write_outputs(result, args.out)
    if args.json:
        write_json_atomic(args.json, result.to_dict())
        paths["json"] = args.json
    _print_summary(result, objective, args, seconds)
    print("wrote " + ", ".join(paths.values()))
    return 0


def _report_holdout(result, graph, holdout, objective, args, prefix) -> None:
    """The found plan against its baselines (all high, all low, the knapsack plan at the same
    budget), on held-out text the search never saw."""
    import mpqc

    kw = dict(
        seq_len=args.seq_len, n_samples=args.holdout_samples, batch_size=args.batch_size, seed=args.seed, prefix=prefix
    )
    qmodel = mpqc.compile(graph, mpqc.Plan.uniform(graph, args.high))
    result.holdout = {"perplexity_high": mpqc.evaluate.perplexity(qmodel, holdout, **kw, progress=False)}
    if objective is not None:
        # The task's documents are the ones the search scored: this baseline is not held out.
        result.objective["value_high"] = objective.evaluate(qmodel).value
    for name in ("all_low", "knapsack"):
        if result.baselines and name in result.baselines:
            qmodel.set_plan(result.baselines[name])
            result.holdout[f"perplexity_{name}"] = mpqc.evaluate.perplexity(qmodel, holdout, **kw, progress=False)
    result.holdout["perplexity_plan"] = mpqc.evaluate.perplexity(
        qmodel.set_plan(result.plan), holdout, **kw, progress=False
    )
    result.holdout["windows"] = args.n_samples


def _print_summary(result, objective, args, seconds: float) -> None:
    best = (
        f"best {result.objective['metric']} {result.metric:.4f} ({result.objective['label']}), perplexity "
        if objective is not None
        else "best perplexity "
    )
    eager = "" if result.eager_perplexity is None else f", {result.eager_perplexity:.3f} eagerly"
    print(
        f"{result.budget} (Q_r: {result.plan.q_r_definition}): {best}{result.perplexity:.3f} "
        f"(search windows{eager}) at {result.achieved:.4f}, "
        f"average bits {result.plan.average_bits():.3f}, after {_trials_text(result)} in {seconds:.0f} s"
    )
    if objective is not None:
        print(
            f"{result.objective['label']}: all {args.high} {result.objective['value_high']:.4f} -> plan "
            f"{result.metric:.4f} {result.objective['metric']} (the documents the search scored)"
        )
    h = result.holdout
    print(
        f"held-out perplexity: all {args.high} {h['perplexity_high']:.3f} -> plan {h['perplexity_plan']:.3f} "
        f"({100 * (h['perplexity_plan'] / h['perplexity_high'] - 1):+.1f}%)"
    )
    baselines = [(f"all {args.low}", "perplexity_all_low"), ("knapsack plan at this budget", "perplexity_knapsack")]
    if any(key in h for _, key in baselines):
        print(
            "  against: "
            + ", ".join(f"{label} {h[key]:.3f}" for label, key in baselines if key in h)
            + f" ({h['windows']} held-out windows)"
        )
    if result.decided is not None:
        d = result.decided
        print(
            f"  chosen among {len(d['contenders'])} contenders (the best on {d['search_windows']} search windows"
            + (f", and the {len(d['anchors'])} one-shot start plans" if d.get("anchors") else "")
            + f") on {d['windows']} fresh search windows; "
            f"search cost {result.cost['total']:.1f} full evaluations"
        )
        if d.get("reference") is not None:
            print(f"  {_against_start(d)}")
    for note in result.notes:
        print(f"note: {note}")
    if result.pareto:
        print(
            "Pareto front (perplexity, Q_r):",
            ", ".join(f"({p['perplexity']:.2f}, {p['quantization_ratio_params']:.3f})" for p in result.pareto),
        )


def _against_start(d: dict) -> str:
    """What the paired comparison with the start plan decided, in a line."""
    if d["winner"] == d["reference"]:
        return (
            f"kept the start plan (trial {d['reference']}): no contender was better on the fresh windows "
            f"at {d['confidence']:.0%} paired confidence"
        )
    row = next(c for c in d["contenders"] if c["trial"] == d["winner"])
    return (
        f"trial {d['winner']} replaced the start plan (trial {d['reference']}): {row['nll_gain']:.4f} nats "
        f"per window lower on the fresh windows (one-sided {d['confidence']:.0%} bound {row['nll_gain_lower']:.4f})"
    )


def _trials_text(result) -> str:
    from mpqc.search.workers import measured

    counted = [t for t in result.study.trials if measured(t)]  # not result.to_dict(): it serializes every plan
    n_pruned = sum(t.state.name == "PRUNED" for t in counted)
    pruned = f" ({n_pruned} stopped early by the pruner)" if n_pruned else ""
    return f"{len(counted)} trials{pruned}"
