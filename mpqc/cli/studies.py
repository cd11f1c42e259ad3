"""mpqc sweep, mpqc fit and mpqc bitsweep: the scaling-law studies (mpqc.studies)."""

from __future__ import annotations

import dataclasses

from mpqc.io import check_output_file


def add_parsers(sub) -> None:
    sw = sub.add_parser("sweep", help="run a scaling-law sweep from a TOML config (resumable)")
    sw.add_argument("config", help="sweep config TOML (schema: docs/scaling.md)")
    sw.add_argument("--out", default=None, help="results CSV (default: the config's out; with --paper, out_paper.csv)")
    sw.add_argument(
        "--paper",
        action="store_true",
        help="the paper's search setting: random, 50 trials, 1024 sequences per trial, instead of the "
        "config's faster [search] sampler, n_trials and n_samples",
    )
    sw.add_argument("--dry-run", action="store_true", help="list the cells and which are finished; run nothing")
    sw.add_argument("--quiet", action="store_true", help="no progress bars")
    sw.set_defaults(func=run_sweep)

    ft = sub.add_parser("fit", help="fit the scaling laws to a sweep's results; figures and a Markdown report")
    ft.add_argument("results", help="results CSV written by mpqc sweep")
    ft.add_argument("--out", default="mpqc-fit", help="directory for laws.json, the PNG figures and report.md")
    ft.add_argument("--budgets", default="0.05,0.1,0.2", help="loss budgets (relative delta_ppl), comma-separated")
    ft.add_argument(
        "--size",
        choices=("total", "non_embedding"),
        default="total",
        help="model size for the laws: all parameters, or without the token embedding (Kaplan et al.)",
    )
    ft.set_defaults(func=run_fit)

    bs = sub.add_parser(
        "bitsweep",
        help="the bit-level sweep (Dettmers & Zettlemoyer): uniform weight-only k-bit plans at each block size, "
        "perplexity against total model bits, the bit-optimal k (resumable)",
    )
    bs.add_argument("config", help="bit-level config TOML (schema: docs/scaling.md, 'The bit-level sweep')")
    bs.add_argument("--out", default=None, help="results CSV (default: the config's out); the verdict goes beside it")
    bs.add_argument("--dry-run", action="store_true", help="list the cells and which are finished; run nothing")
    bs.add_argument("--quiet", action="store_true", help="no progress bars")
    bs.set_defaults(func=run_bitsweep)


def run_sweep(args) -> int:
    from mpqc.studies import sweep

    config = sweep.load_config(args.config)
    if args.paper:
        config = sweep.paper_setting(config)
    if args.out:
        config = dataclasses.replace(config, out=args.out)
    check_output_file(config.out, "the results file (out)")  # before any model loads
    s = config.search
    print(
        f"sweep: search {s['sampler']}, {s['n_trials']} trials x {s['n_samples']} windows of {s['seq_len']} tokens"
        f"{' (the paper setting)' if args.paper else ''}; results in {config.out}"
    )
    if args.dry_run:  # list the cells and which are done, run nothing
        states = sweep.cell_states(config)  # from the storage too, when the sweep has one
        for cell in config.cells():
            state = states[config.key(cell)]
            print(
                f"{state}  {cell.model.name} {cell.granularity} Q_r>={cell.ratio:g} {cell.low}"
                f"{' weights-only' if cell.weights_only else ''} block {cell.block_size} seed {cell.seed}"
            )
        return 0
    summary = sweep.run(config, progress=not args.quiet)
    print(
        f"sweep: ran {summary.ran} cells, skipped {summary.skipped} finished ones, "
        f"in {summary.seconds:.0f} s; results in {summary.out}"
    )
    return 0


def run_fit(args) -> int:
    from mpqc.studies import report

    budgets = tuple(float(b) for b in args.budgets.split(","))
    paths = report.write_report(args.results, args.out, budgets=budgets, size=args.size)
    print("wrote " + ", ".join(paths.values()))
    return 0


def run_bitsweep(args) -> int:
    import os

    from mpqc.io import json_safe, write_json_atomic
    from mpqc.studies import bitlevel
    from mpqc.studies.report.figures import fig_bitlevel

    config = bitlevel.load_config(args.config)
    if args.out:
        config = dataclasses.replace(config, out=args.out)
    check_output_file(config.out, "the results file (out)")  # before any model loads
    if args.dry_run:
        done = bitlevel.finished_keys(config.out)
        for cell in config.cells():
            state = "done" if config.key(cell) in done else "todo"
            print(f"{state}  {cell.model.name} {cell.format} block {cell.block_size or '-'}")
        return 0
    summary = bitlevel.run(config, progress=not args.quiet)
    rows = bitlevel.read_results(config.out)
    result = bitlevel.bit_optimal(rows)
    verdict_path = os.path.splitext(config.out)[0] + "_bit_optimal.json"
    write_json_atomic(verdict_path, json_safe(result))
    figure_path = os.path.splitext(config.out)[0] + "_bits.png"
    fig_bitlevel(rows, result, figure_path)
    print(bit_optimal_table(result))
    print(
        f"bitsweep: ran {summary.ran} cells, skipped {summary.skipped} finished ones, in {summary.seconds:.0f} s; "
        f"results in {summary.out}, the bit-optimal k in {verdict_path}, the figure in {figure_path}"
    )
    return 0


def bit_optimal_table(result: dict) -> str:
    """The best configuration within each total-bits budget, and the verdict."""
    lines = [
        "| total-bits budget | bits per parameter | k | format | block | model | perplexity |",
        "| ---: | ---: | ---: | --- | ---: | --- | ---: |",
    ]
    for b in result["budgets"]:
        block = "-" if not isinstance(b["block_size"], int) else b["block_size"]
        lines.append(
            f"| {b['budget_bits']:,.0f} | {b['bits_per_param']:.3f} | {b['bits']} | {b['format']} | {block} | "
            f"{b['model']} | {b['ppl']:.3f} |"
        )
    return "\n".join([*lines, "", result["verdict"]])
