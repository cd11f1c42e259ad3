"""Train a family of Llama-style models of several sizes for the scaling-law sweeps.

No family of pretrained sizes reaches this machine (docs/scaling.md), so we train our own on
real text (mpqc.studies.family holds the presets and the resumable training):

    python examples/train_family.py --out runs/family               # CPU: toy scale, a few minutes
    python examples/train_family.py --out runs/family --preset gpu   # CUDA: larger sizes, more steps
    python examples/train_family.py --out runs/cpu-family --preset cpu-family --estimate
    python examples/train_family.py --out runs/cpu-family --preset cpu-family --max-minutes 240

``toy`` and ``gpu`` train each size a fixed number of steps on the leading 90% of ``--text``
(the trailing 10% that the sweep evaluates on is never trained on). ``cpu-family`` builds the
corpus of mpqc.corpus under ``<out>/corpus`` and trains six sizes x three seeds on its train
split, with training tokens matched to the parameters; ``--estimate`` times a few steps of
each size and prints the CPU budget instead of training.

Each run (size, seed) is a Hugging Face directory (``save_pretrained`` + the tokenizer) that
``mpqc.load_model`` and ``mpqc sweep`` load like any model, with ``train_log.json`` (written
last: the run is finished) beside it. A rerun skips finished runs and continues a stopped one
from its checkpoint (``--max-minutes`` stops cleanly); everything is seeded, so the same
settings give the same weights on the same machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

from mpqc.studies.family import PRESETS, cpu_settings, estimate_budget, parse_sizes, prepare, train_family

__all__ = ["main", "parse_sizes"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/family", help="folder for one Hugging Face directory per run")
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="default: gpu when CUDA is available, else toy"
    )
    p.add_argument("--sizes", default=None, help="override the preset: name:hidden:layers:heads,...")
    p.add_argument("--only", default=None, help="train only these of the preset's sizes (names, comma-separated)")
    p.add_argument("--text", default=None, help="toy/gpu: mpqc.data text spec (default wiki)")
    p.add_argument("--corpus", default=None, help="cpu-family: the corpus folder (default <out>/corpus)")
    p.add_argument(
        "--austen-dir", default=None, help="cpu-family: janeaustenr's data folder, if not where Debian puts it"
    )
    p.add_argument("--python-doc-dir", default=None, help="cpu-family: python3.11-doc's html folder, likewise")
    for flag, kind in (("--steps", int), ("--vocab", int), ("--batch", int), ("--seq-len", int)):
        p.add_argument(flag, type=kind, default=None)
    p.add_argument("--tokens-per-param", type=float, default=None, help="matched tokens per non-embedding parameter")
    p.add_argument("--max-epochs", type=float, default=None, help="the cap on tokens, in passes over the train split")
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="the one training seed of toy/gpu (directories: <size>)")
    p.add_argument("--seeds", default=None, help="training seeds, comma-separated (directories: <size>-seed<k>)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop cleanly (checkpointed) after this long")
    p.add_argument("--estimate", action="store_true", help="time a few steps per size, print the budget, train nothing")
    p.add_argument("--estimate-steps", type=int, default=5, help="timed steps per size for --estimate")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: small models gain little from more, a shared machine loses "
        "much, and a fixed count keeps the sums in the same order run to run)",
    )
    return p


def _preset(args, device: torch.device):
    preset = PRESETS[args.preset or ("gpu" if device.type == "cuda" else "toy")]
    changes = {k: getattr(args, k) for k in ("vocab", "seq_len", "tokens_per_param", "max_epochs") if getattr(args, k)}
    if args.checkpoint_every is not None:
        changes["checkpoint_every"] = args.checkpoint_every
    if args.steps is not None:
        changes |= {"steps": args.steps, "tokens_per_param": None}
    if args.tokens_per_param is not None:
        changes["steps"] = None
    sizes = parse_sizes(args.sizes, preset)
    if args.batch is not None:  # one batch for every size
        changes["batch"] = args.batch
        sizes = tuple(dataclasses.replace(s, batch=None) for s in sizes)
    return dataclasses.replace(preset, sizes=sizes, **changes)


def _seeds(args, preset) -> tuple[tuple[int, ...], bool]:
    if args.seeds:
        return tuple(int(s) for s in args.seeds.split(",")), True
    if preset.seeds is not None:
        return preset.seeds, True
    return (args.seed,), False


def _print_budget(rows: list[dict], out: Path) -> None:
    from mpqc.io import write_json_atomic

    print(
        "| size | hidden x layers | params (total) | non-embedding | tokens | tokens/param | steps x batch | ms/step | h per seed | h, all seeds |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        capped = " (capped)" if r["capped"] else ""
        print(
            f"| {r['size']} | {r['hidden']} x {r['layers']} | {r['params']:,} | {r['non_embedding']:,} | {r['tokens']:,} | "
            f"{r['tokens_per_param']:.1f}{capped} | {r['steps']} x {r['batch']} | {r['seconds_per_step'] * 1000:.1f} | "
            f"{r['hours_per_seed']:.2f} | {r['hours']:.2f} |"
        )
    print(f"total: {sum(r['hours'] for r in rows):.1f} CPU hours")
    write_json_atomic(out / "budget.json", {"measured_on": os.uname().nodename, "rows": rows})


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = _preset(args, device)
    seeds, seeded = _seeds(args, preset)
    out = Path(args.out)
    paths = {k: v for k, v in (("austen", args.austen_dir), ("python-doc", args.python_doc_dir)) if v}
    if preset.corpus and args.text:
        raise SystemExit(f"--text is for the toy and gpu presets; {args.preset} trains on the corpus (--corpus DIR)")
    where = (
        {"corpus_dir": Path(args.corpus) if args.corpus else None, "corpus_paths": paths}
        if preset.corpus
        else {"text": args.text}
    )
    if args.estimate:
        with cpu_settings(device, args.threads):
            data, plans = prepare(out, preset, seeds=seeds, seeded=seeded, **where)
            rows = estimate_budget(plans, preset, len(data.tokenizer), device, steps=args.estimate_steps)
        _print_budget(rows, out)
        return 0
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None
    only = set(args.only.split(",")) if args.only else None
    results = train_family(
        out,
        preset,
        seeds=seeds,
        seeded=seeded,
        device=device,
        threads=args.threads,
        only=only,
        deadline=deadline,
        **where,
    )
    left = [plan.name for plan, status in results if status in ("stopped", "not started")]
    print(
        f"{len(results) - len(left)} of {len(results)} runs finished" + (f"; left: {', '.join(left)}" if left else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
