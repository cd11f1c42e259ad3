"""The mpqc command line; it mirrors the Python API.

    mpqc formats                       the number formats and their bits per element
    mpqc inspect [MODEL]               the matmul / component table of a captured model
    mpqc compile [MODEL] [--plan P]    compile with a plan, report perplexity before and after
    mpqc search [MODEL] --ratio 0.9    search the best plan under a budget; writes plan and trials
    mpqc export [MODEL] --plan P       ONNX with low-bit weights and precision metadata
    mpqc sweep CONFIG.toml             a resumable scaling-law sweep into one results table
    mpqc fit RESULTS.csv --out DIR     fitted laws, figures and a Markdown report
    mpqc bitsweep CONFIG.toml          k-bit block formats x block sizes: perplexity against total bits
    mpqc predict collect|fit|plan      predict a plan's delta_ppl from cheap measurements

MODEL is a local Hugging Face directory, a .gguf file, or (left out) the embedded default,
SmolLM2-135M. Every command that prints a table can also write it as JSON (--json); every
command that loads a model takes --device and --dtype. One module per command; this one
only assembles the parser. Nothing else in mpqc imports this package.
"""

from __future__ import annotations

import argparse
import sys

from . import compile as compile_cmd
from . import export, formats, inspect, predict, search, studies, validate

# An interrupted command exits like a shell's Ctrl-C: 128 + SIGINT.
EXIT_INTERRUPTED = 130
EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpqc", description="Mixed-precision quantization compiler for language models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    formats.add_parser(sub)
    inspect.add_parser(sub)
    compile_cmd.add_parser(sub)
    search.add_parser(sub)
    studies.add_parsers(sub)
    predict.add_parser(sub)
    export.add_parser(sub)
    return parser


def main(argv=None) -> int:
    """Run one command: its errors are one line naming what is wrong (exit 2), Ctrl-C says what
    was kept and how to resume (exit 130); the output paths are checked before any work."""
    args = build_parser().parse_args(argv)
    name = validate.command_name(args)
    try:
        validate.before_work(args)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\nmpqc {name}: interrupted; {validate.interrupted(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, KeyError, TypeError, OSError, ImportError) as e:
        print(f"mpqc {name}: error: {_message(e)}", file=sys.stderr)
        return EXIT_ERROR


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])  # str() of a KeyError quotes its message
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)


if __name__ == "__main__":
    sys.exit(main())
