"""Time mpqc.formats.quantize against a copy of the same tensor, on the CPU.

Prints, per MX preset (and NVFP4), the median time of quantize and of x.clone() for a
4096 x 4096 float32 tensor, interleaved, and their ratio; for each path that exists
(the dispatched default, and the plain-PyTorch reference). Writes the table as JSON too.

    python benchmarks/quantize.py [--size 4096] [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mpqc.formats import FORMATS, kernels
from mpqc.formats.reference import quantize_reference

PRESETS = ["mxint8", "mxint4", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "nvfp4"]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--formats", default=",".join(PRESETS))
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()

    x = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    paths = {"default": kernels.quantize, "reference": quantize_reference}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, x: {tuple(x.shape)} float32, "
        f"default path: {kernels.describe()}"
    )
    rows = []
    for name in args.formats.split(","):
        fmt = FORMATS[name]
        block = fmt.block_size
        for path, fn in paths.items():
            call = lambda: fn(x, fmt, block, 1, "nearest")  # noqa: E731
            call(), call()  # warm up (and compile, for fused paths)
            t_q, t_c = [], []
            for _ in range(args.repeats):  # interleave so that drift hits both alike
                t_c.append(timed(x.clone))
                t_q.append(timed(call))
            q, c = statistics.median(t_q), statistics.median(t_c)
            rows.append({"format": name, "path": path, "quantize_ms": q * 1e3, "clone_ms": c * 1e3, "ratio": q / c})
    print(f"{'format':<12} {'path':<10} {'quantize ms':>12} {'clone ms':>9} {'x clone':>8}")
    for r in rows:
        print(f"{r['format']:<12} {r['path']:<10} {r['quantize_ms']:>12.1f} {r['clone_ms']:>9.2f} {r['ratio']:>8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
