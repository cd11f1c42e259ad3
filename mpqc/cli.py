"""The mpqc command line; it mirrors the Python API.

    mpqc formats                       the number formats and their bits per element
    mpqc inspect [MODEL]               the matmul / component table of a captured model
    mpqc compile [MODEL] [--plan P]    compile with a plan, report perplexity before and after
    mpqc search [MODEL] --ratio 0.9    search the best plan under a budget; writes plan and trials
    mpqc export [MODEL] --plan P       ONNX with low-bit weights and precision metadata
    mpqc sweep CONFIG.toml             a resumable scaling-law sweep into one results table
    mpqc fit RESULTS.csv --out DIR     fitted laws, figures and a Markdown report
    mpqc predict collect|fit|plan      predict a plan's delta_ppl from cheap measurements

MODEL is a local Hugging Face directory, a .gguf file, or (left out) the embedded default,
SmolLM2-135M. Every command that prints a table can also write it as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json_atomic(path: str, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))


# ---- formats ----------------------------------------------------------------------------------


def cmd_formats(args) -> int:
    from mpqc.formats import FORMATS

    rows = []
    for f in FORMATS.values():
        e = f.element
        rows.append({
            "name": f.name,
            "family": f.family,
            "element": "cast to " + f.cast_dtype if e is None else e.name,
            "element_bits": f.element_bits,
            "max_normal": None if e is None else e.max_normal,
            "scale": f.scale.name,
            "block": f.block_size,
            "bits_per_element": f.bits_per_element,
        })
    print(f"{'format':<12} {'family':<7} {'element':<18} {'max':>9} {'scale':<6} {'block':<7} {'bits/elem':>9}")
    for r in rows:
        mx = "-" if r["max_normal"] is None else f"{r['max_normal']:g}"
        print(f"{r['name']:<12} {r['family']:<7} {r['element']:<18} {mx:>9} {r['scale']:<6} {str(r['block'] or '-'):<7} "
              f"{r['bits_per_element']:>9.3f}")
    if args.json:
        write_json_atomic(args.json, rows)
    return 0


# ---- inspect / compile --------------------------------------------------------------------------


DTYPES = ("float32", "bfloat16", "float16")


def add_device_args(sp) -> None:
    sp.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:N")
    sp.add_argument("--dtype", default="float32", choices=DTYPES,
                    help="the model's dtype (default float32; bfloat16 on a GPU)")


def _load_and_capture(spec, seq_len: int, device: str = "cpu", dtype: str = "float32"):
    import torch

    import mpqc

    t0 = time.perf_counter()
    model, tokenizer = mpqc.load_model(spec, device=device, dtype=getattr(torch, dtype))
    print(f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} parameters, {dtype}, "
          f"{device}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    t0 = time.perf_counter()
    example = torch.zeros(2, min(seq_len, 64), dtype=torch.long)
    graph = mpqc.capture(model, (example,))
    print(f"captured {len(graph.matmuls)} matmuls in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return model, tokenizer, graph


def _plan_from_args(graph, args):
    """--plan JSON if given, else a uniform --format plan (--weights-only, --block-size)."""
    import mpqc

    if args.plan:
        with open(args.plan) as f:
            return mpqc.Plan.from_json(graph, f.read())
    return mpqc.Plan.uniform(graph, args.format, granularity="matmul", activations=not args.weights_only,
                             block_size=args.block_size)


def cmd_inspect(args) -> int:
    _, _, graph = _load_and_capture(args.model, 64)
    print(graph.summary())
    comps = graph.components(args.granularity)
    print(f"\n{len(comps)} components at {args.granularity} granularity; "
          f"{graph.total_params:,} matmul parameters")
    if args.json:
        write_json_atomic(args.json, {**graph.to_dict(), "components": {
            args.granularity: [{"name": c.name, "layer": c.layer, "params": c.params, "macs": c.macs,
                                "matmuls": [m.name for m in c.matmuls]} for c in comps]}})
    return 0


def cmd_compile(args) -> int:
    import mpqc
    from mpqc.data import load_tokens, split_tokens, text_prefix

    model, tokenizer, graph = _load_and_capture(args.model, args.seq_len, args.device, args.dtype)
    plan = _plan_from_args(graph, args)
    tokens = load_tokens(tokenizer, args.text)
    _, holdout = split_tokens(tokens)  # report on text the search never sees
    kw = dict(seq_len=args.seq_len, n_samples=args.n_samples, batch_size=args.batch_size, seed=args.seed,
              prefix=text_prefix(tokenizer))
    qmodel = mpqc.compile(graph, mpqc.Plan.uniform(graph, "fp32"))
    t0 = time.perf_counter()
    base = mpqc.evaluate.perplexity(qmodel, holdout, **kw)
    t_base = time.perf_counter() - t0
    qmodel.set_plan(plan)
    t0 = time.perf_counter()
    quant = mpqc.evaluate.perplexity(qmodel, holdout, **kw)
    t_quant = time.perf_counter() - t0
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
    print(f"quantization ratio (params) {s['quantization_ratio_params']:.3f}, (MACs) {s['quantization_ratio_macs']:.3f}, "
          f"average bits per weight {s['average_bits']:.3f}")
    print(f"perplexity unquantized ({graph.dtype}) {base:.3f} -> quantized {quant:.3f} (delta {100 * result['delta_ppl']:+.2f}%) "
          f"on {args.n_samples} x {args.seq_len} held-out tokens")
    if args.json:
        write_json_atomic(args.json, result)
    return 0


def cmd_search(args) -> int:
    import mpqc
    from mpqc.data import load_tokens, split_tokens, text_prefix
    from mpqc.search import PAPER_SETTING, write_outputs

    if args.paper:
        args.sampler, args.n_trials, args.n_samples = PAPER_SETTING["sampler"], PAPER_SETTING["n_trials"], PAPER_SETTING["n_samples"]
    sampler_kwargs = json.loads(args.sampler_kwargs) if args.sampler_kwargs else None
    if args.bits is not None:
        budget = ("bits", args.bits)
    else:
        budget = ("macs" if args.by_macs else "params", args.ratio)
    if args.lm_eval_task is not None:  # fail before the model loads, not after
        from mpqc.search import lm_eval_adapter

        try:
            lm_eval_adapter.require_lm_eval()
        except ImportError as e:
            print(f"mpqc search: error: --lm-eval-task: {e}", file=sys.stderr)
            return 2
        lm_eval_adapter.resolve_task(args.lm_eval_task, args.lm_eval_include)
    elif args.lm_eval_include or args.lm_eval_limit is not None or args.lm_eval_metric or args.lm_eval_fewshot is not None:
        raise ValueError("--lm-eval-include/--lm-eval-limit/--lm-eval-metric/--lm-eval-fewshot need --lm-eval-task")
    _, tokenizer, graph = _load_and_capture(args.model, args.seq_len, args.device, args.dtype)
    search_tokens, holdout = split_tokens(load_tokens(tokenizer, args.text))
    objective = None
    if args.lm_eval_task is not None:
        limit = args.lm_eval_limit
        limit = int(limit) if limit is not None and limit >= 1 and float(limit).is_integer() else limit
        objective = lm_eval_adapter.LMEvalObjective(
            task=args.lm_eval_task, tokenizer=tokenizer, metric=args.lm_eval_metric, limit=limit,
            include_path=args.lm_eval_include, num_fewshot=args.lm_eval_fewshot, seed=args.seed,
            batch_size=args.batch_size)
    t0 = time.perf_counter()
    result = mpqc.search.run(
        graph, search_tokens, budget=budget, granularity=args.granularity, low=args.low, high=args.high,
        weights_only=args.weights_only, sampler=args.sampler, sampler_kwargs=sampler_kwargs, n_trials=args.n_trials,
        seq_len=args.seq_len, n_samples=args.n_samples, batch_size=args.batch_size, seed=args.seed,
        storage=args.storage, study_name=args.study_name, block_size=args.block_size, objective=objective,
        torch_compile=args.torch_compile, prefix=text_prefix(tokenizer),
    )
    seconds = time.perf_counter() - t0
    # The found plan against the all-high baseline, on held-out text the search never saw.
    kw = dict(seq_len=args.seq_len, n_samples=args.n_samples, batch_size=args.batch_size, seed=args.seed,
              prefix=text_prefix(tokenizer))
    qmodel = mpqc.compile(graph, mpqc.Plan.uniform(graph, args.high))
    result.holdout = {"perplexity_high": mpqc.evaluate.perplexity(qmodel, holdout, **kw, progress=False)}
    if objective is not None:
        # The task's documents are the ones the search scored: this baseline is not held out.
        result.objective["value_high"] = objective.evaluate(qmodel).value
    result.holdout["perplexity_plan"] = mpqc.evaluate.perplexity(qmodel.set_plan(result.plan), holdout, **kw, progress=False)
    paths = write_outputs(result, args.out)
    best = (f"best {result.objective['metric']} {result.metric:.4f} ({result.objective['label']}), perplexity "
            if objective is not None else "best perplexity ")
    eager = "" if result.eager_perplexity is None else f", {result.eager_perplexity:.3f} eagerly"
    print(f"{result.budget}: {best}{result.perplexity:.3f} (search windows{eager}) at {result.achieved:.4f}, "
          f"average bits {result.plan.average_bits():.3f}, after {len(result.study.trials)} trials "
          f"in {seconds:.0f} s")
    if objective is not None:
        print(f"{result.objective['label']}: all {args.high} {result.objective['value_high']:.4f} -> plan "
              f"{result.metric:.4f} {result.objective['metric']} (the documents the search scored)")
    h = result.holdout
    print(f"held-out perplexity: all {args.high} {h['perplexity_high']:.3f} -> plan {h['perplexity_plan']:.3f} "
          f"({100 * (h['perplexity_plan'] / h['perplexity_high'] - 1):+.1f}%)")
    for note in result.notes:
        print(f"note: {note}")
    if result.pareto:
        print("Pareto front (perplexity, Q_r):", ", ".join(f"({p['perplexity']:.2f}, {p['quantization_ratio_params']:.3f})"
                                                         for p in result.pareto))
    print("wrote " + ", ".join(paths.values()))
    return 0


# ---- sweep / fit (scaling-law studies) ----------------------------------------------------------


def cmd_sweep(args) -> int:
    import dataclasses

    from mpqc import sweep

    config = sweep.load_config(args.config)
    if args.out:
        config = dataclasses.replace(config, out=args.out)
    if args.dry_run:  # list the cells and which are done, run nothing
        done = sweep.finished_keys(config.out)
        for cell in config.cells():
            state = "done" if config.key(cell) in done else "todo"
            print(f"{state}  {cell.model.name} {cell.granularity} Q_r>={cell.ratio:g} {cell.low}"
                  f"{' weights-only' if cell.weights_only else ''} block {cell.block_size} seed {cell.seed}")
        return 0
    summary = sweep.run(config, progress=not args.quiet)
    print(f"sweep: ran {summary.ran} cells, skipped {summary.skipped} finished ones, "
          f"in {summary.seconds:.0f} s; results in {summary.out}")
    return 0


def cmd_fit(args) -> int:
    from mpqc import report

    budgets = tuple(float(b) for b in args.budgets.split(","))
    paths = report.write_report(args.results, args.out, budgets=budgets)
    print("wrote " + ", ".join(paths.values()))
    return 0


# ---- export -------------------------------------------------------------------------------------


def cmd_export(args) -> int:
    import mpqc
    from mpqc.export import to_onnx

    _, _, graph = _load_and_capture(args.model, 64)
    plan = _plan_from_args(graph, args)
    qmodel = mpqc.compile(graph, plan)
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    result = to_onnx(qmodel, args.output, opset=args.opset, fp_weights=args.fp_weights, external_data=external)
    s = plan.summary()
    print(f"plan: {plan}")
    print(f"wrote {result.path} ({result.file_bytes / 2**20:.2f} MiB{', data in ' + result.data_path if result.data_path else ''}): "
          f"{result.weights} low-bit weights ({result.weight_bytes / 2**20:.2f} MiB), {result.activations} activation "
          f"quantizers, opset {result.opset}, fp weights as {result.fp_weights}; Q_r {s['quantization_ratio_params']:.3f}, "
          f"average bits {s['average_bits']:.3f}; {sum(result.seconds.values()):.1f} s")
    if args.json:
        write_json_atomic(args.json, {"model": args.model or "smollm2-135m", "model_class": graph.model_class,
                                      "plan": json.loads(plan.to_json()), **result.to_dict()})
    return 0


# ---- parser ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpqc", description="Mixed-precision quantization compiler for language models.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("formats", help="list the number formats")
    f.add_argument("--json", help="also write the table here")
    f.set_defaults(func=cmd_formats)

    def model_args(sp):
        sp.add_argument("model", nargs="?", default=None,
                        help="local HF directory, .gguf file, or nothing for the embedded SmolLM2-135M")
        sp.add_argument("--json", help="also write the result here (JSON)")

    def plan_args(sp):
        sp.add_argument("--plan", help="plan JSON (from Plan.to_json or mpqc search); default: uniform --format")
        sp.add_argument("--format", default="mxint4", help="format of a uniform plan (default mxint4)")
        sp.add_argument("--weights-only", action="store_true", help="keep activations in bf16")
        sp.add_argument("--block-size", type=_block, default=None, help="block size (int, vector or tensor)")

    i = sub.add_parser("inspect", help="print the matmuls and components of a model")
    model_args(i)
    i.add_argument("--granularity", default="matmul", choices=["matmul", "layer"])
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("compile", help="compile with a plan and report perplexity before and after")
    model_args(c)
    add_device_args(c)
    plan_args(c)
    c.add_argument("--text", default=None, help="text: 'wiki' (embedded default), a .txt file or dir, hf:NAME")
    c.add_argument("--seq-len", type=int, default=256)
    c.add_argument("--n-samples", type=int, default=16)
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_compile)

    s = sub.add_parser("search", help="search the best plan under a quantization-ratio or bits budget")
    model_args(s)
    add_device_args(s)
    s.add_argument("--ratio", type=float, default=0.9, help="Q_r budget: share of matmul parameters in low precision")
    s.add_argument("--by-macs", action="store_true", help="the ratio counts MACs instead of parameters")
    s.add_argument("--bits", type=float, default=None, help="instead of a ratio: average bits per weight at most this")
    s.add_argument("--granularity", default="matmul", choices=["matmul", "layer"])
    s.add_argument("--low", default="mxint4")
    s.add_argument("--high", default="bf16")
    s.add_argument("--weights-only", action="store_true", help="activations stay at --high")
    s.add_argument("--block-size", type=_block, default=None)
    s.add_argument("--sampler", default="sensitivity",
                   help="sensitivity (default), random, tpe, cmaes, gp, qmc, nsga2, or package.module:Class")
    s.add_argument("--sampler-kwargs", default=None, help="JSON keyword arguments for the sampler")
    s.add_argument("--n-trials", type=int, default=12)
    s.add_argument("--torch-compile", action="store_true",
                   help="evaluate trials through torch.compile: one compile for the whole search, then faster trials")
    s.add_argument("--paper", action="store_true", help="the paper's setting: random, 50 trials, 1024 sequences")
    s.add_argument("--text", default=None)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--n-samples", type=int, default=8)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--storage", default=None, help="SQLite file or database URL: resumable, shareable by workers")
    s.add_argument("--study-name", default=None)
    s.add_argument("--out", default="mpqc-search", help="directory for best_plan.json, trials.csv, result.json")
    s.add_argument("--lm-eval-task", default=None, metavar="NAME_OR_YAML",
                   help="objective: an lm-eval-harness task's metric instead of perplexity (a task name such as "
                        "mmlu, or a task YAML); needs `pip install lm_eval`")
    s.add_argument("--lm-eval-include", action="append", default=None, metavar="DIR",
                   help="a directory of custom lm-eval task YAMLs (repeatable)")
    s.add_argument("--lm-eval-limit", type=float, default=None, metavar="N",
                   help="score the first N documents of each task (a fraction if below 1); default all")
    s.add_argument("--lm-eval-metric", default=None, help="the task's metric to optimize, e.g. acc (default: its first)")
    s.add_argument("--lm-eval-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    s.set_defaults(func=cmd_search)

    sw = sub.add_parser("sweep", help="run a scaling-law sweep from a TOML config (resumable)")
    sw.add_argument("config", help="sweep config TOML (schema: docs/scaling.md)")
    sw.add_argument("--out", default=None, help="results CSV (default: the config's out)")
    sw.add_argument("--dry-run", action="store_true", help="list the cells and which are finished; run nothing")
    sw.add_argument("--quiet", action="store_true", help="no progress bars")
    sw.set_defaults(func=cmd_sweep)

    ft = sub.add_parser("fit", help="fit the scaling laws to a sweep's results; figures and a Markdown report")
    ft.add_argument("results", help="results CSV written by mpqc sweep")
    ft.add_argument("--out", default="mpqc-fit", help="directory for laws.json, the PNG figures and report.md")
    ft.add_argument("--budgets", default="0.05,0.1,0.2", help="loss budgets (relative delta_ppl), comma-separated")
    ft.set_defaults(func=cmd_fit)

    from mpqc.predict_cli import add_parser as add_predict_parser

    add_predict_parser(sub)

    e = sub.add_parser("export", help="export to ONNX: low-bit weights, mpqc activation functions, precision metadata")
    model_args(e)
    plan_args(e)
    e.add_argument("-o", "--output", default="model.onnx", help="the ONNX file to write (default model.onnx)")
    e.add_argument("--fp-weights", default="table", choices=["table", "standard"],
                   help="float-element weights as uint8 codes + lookup table (runs in ONNX Runtime) or as standard "
                        "FLOAT4E2M1/FLOAT8 DequantizeLinear (opset 25)")
    e.add_argument("--opset", type=int, default=None, help="default 21 (25 with --fp-weights standard)")
    e.add_argument("--external-data", default="auto", choices=["auto", "yes", "no"],
                   help="weights in <output>.data: by size (auto, above 1 GiB), always, never")
    e.set_defaults(func=cmd_export)
    return p


def _block(text: str):
    return text if text in ("vector", "tensor") else int(text)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        print(f"mpqc {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
