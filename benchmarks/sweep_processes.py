"""Sweep throughput on this machine's cores: one process, or two at once with torch's default
threads, or two at once with one thread each (OMP_NUM_THREADS=1), over the same cells.

Each mode runs ``mpqc sweep`` on copies of one sweep config restricted to ``--models`` of its
models (split between the two processes by model), writing to a fresh temporary folder, so
every mode runs every cell from scratch. It prints the wall time of each mode, the cells per
second and the ratio to one process.

    python benchmarks/sweep_processes.py examples/sweep_cpu_family_layer.toml --models fam-3-seed0,fam-3-seed1
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from mpqc.studies.sweep import read_toml

MODES = (
    ("one process, default threads", 1, None),
    ("two processes, default threads", 2, None),
    ("two processes, one thread each", 2, "1"),
)


def _config_text(source: str, models: list[str], out: str) -> str:
    """The config at ``source`` with only ``models`` (folder names) and its out at ``out``."""
    data = read_toml(source, "sweep config")
    base = os.path.dirname(os.path.abspath(source))
    chosen = [m for m in data["models"] if os.path.basename(os.path.normpath(m["path"])) in models]
    lines = [f'out = "{out}"', f'text = "{os.path.join(base, data["text"])}"', "models = ["]
    for m in chosen:
        extra = "".join(f", {k} = {v!r}" for k, v in m.items() if k != "path")
        lines.append(f'  {{ path = "{os.path.join(base, m["path"])}"{extra} }},')
    lines.append("]")
    for section in ("grid", "search", "eval"):
        lines.append(f"[{section}]")
        for k, v in data.get(section, {}).items():
            lines.append(f"{k} = {_toml(v)}")
    return "\n".join(lines) + "\n"


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return repr(value)


def run_mode(source: str, models: list[str], processes: int, threads: str | None) -> float:
    """Seconds for ``processes`` sweeps at once over ``models`` (split by model)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        if threads is not None:
            env["OMP_NUM_THREADS"] = threads
        parts = [models[i::processes] for i in range(processes)]
        commands = []
        for i, part in enumerate(parts):
            path = os.path.join(tmp, f"part{i}.toml")
            with open(path, "w") as f:
                f.write(_config_text(source, part, os.path.join(tmp, f"part{i}.csv")))
            commands.append(
                [sys.executable, "-c", "import sys, mpqc.cli; sys.exit(mpqc.cli.main())", "sweep", path, "--quiet"]
            )
        t0 = time.perf_counter()
        procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in commands]
        codes = [p.wait() for p in procs]
        seconds = time.perf_counter() - t0
        if any(codes):
            raise RuntimeError(f"a sweep process failed (exit codes {codes})")
        return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--models", required=True, help="comma-separated model folder names of the config")
    args = ap.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if len(models) < 2:
        raise SystemExit("--models needs at least two models, one per process")
    grid = read_toml(args.config, "sweep config")["grid"]
    cells = len(models)
    for key in ("granularity", "ratio", "formats", "block_size", "seed"):
        cells *= len(grid[key])
    print(f"{cells} cells ({len(models)} models of {args.config}) per mode, on {os.cpu_count()} cores")
    print("| mode | seconds | cells per second | vs one process |")
    print("| --- | ---: | ---: | ---: |")
    first = None
    for label, processes, threads in MODES:
        seconds = run_mode(args.config, models, processes, threads)
        first = first or seconds
        print(f"| {label} | {seconds:.1f} | {cells / seconds:.2f} | {first / seconds:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
