"""What several commands share: argument groups, model loading, the plan a command runs."""

from __future__ import annotations

import sys
import time

from mpqc.formats.spec import parse_block_size

DTYPES = ("float32", "bfloat16", "float16")
MODEL_HELP = "local HF directory, .gguf file, or nothing for the embedded SmolLM2-135M"


def add_model_args(parser, *, json_help: str = "also write the result here (JSON)") -> None:
    """MODEL, --json, --device and --dtype: every command that loads a model takes them."""
    parser.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    if json_help:
        parser.add_argument("--json", help=json_help)
    add_device_args(parser)


def add_device_args(parser) -> None:
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:N")
    parser.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="the model's dtype (default float32; bfloat16 on a GPU)"
    )


def add_block_size_arg(parser) -> None:
    parser.add_argument(
        "--block-size",
        type=parse_block_size,
        default=None,
        help="block size: an int, vector, tensor or default (the format's own)",
    )


def add_plan_args(parser) -> None:
    parser.add_argument("--plan", help="plan JSON (from Plan.to_json or mpqc search); default: uniform --format")
    parser.add_argument("--format", default="mxint4", help="format of a uniform plan (default mxint4)")
    parser.add_argument("--weights-only", action="store_true", help="keep activations in bf16")
    add_block_size_arg(parser)


def load_and_capture(spec, seq_len: int, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer, graph) of a model spec, with what it took on stderr."""
    import torch

    import mpqc

    t0 = time.perf_counter()
    model, tokenizer = mpqc.load_model(spec, device=device, dtype=getattr(torch, dtype))
    print(
        f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} parameters, {dtype}, "
        f"{device}) in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    example = torch.zeros(2, min(seq_len, 64), dtype=torch.long)
    graph = mpqc.capture(model, (example,))
    print(f"captured {len(graph.matmuls)} matmuls in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return model, tokenizer, graph


def plan_from_args(graph, args):
    """--plan JSON if given, else a uniform --format plan (--weights-only, --block-size)."""
    import mpqc

    if args.plan:
        return mpqc.Plan.from_file(graph, args.plan)  # errors name the file and the key
    return mpqc.Plan.uniform(
        graph, args.format, granularity="matmul", activations=not args.weights_only, block_size=args.block_size
    )
