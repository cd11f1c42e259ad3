"""Time the Triton quantize kernels against a device-to-device copy, on a CUDA GPU.

For 8192 x 8192 float32 and bfloat16 inputs and every MX preset at block 32 plus NVFP4
(block 16), prints the median time of: the Triton kernels (what ``mpqc.formats.quantize``
runs on CUDA), the plain-PyTorch reference, the reference compiled by torch.compile, and
``x.clone()``; the achieved TB/s (bytes read + bytes written, input and output once each)
and the ratio to the copy's; and whether the Triton output equals the reference's on the
same tensor bit for bit. NVFP4's kernels read the input twice (the tensor absmax first),
which the TB/s column, counting one read, shows as a lower figure.

Needs only torch, triton and this checkout: it loads ``mpqc/formats`` without running
``mpqc/__init__`` (which imports optuna and transformers), so from the repository root

    python benchmarks/quantize_gpu.py [--size 8192] [--json out.json] [--skip-compiled] [--no-tune]

works without installing mpqc. Sections print as they finish (copy/Triton/equality first,
then the reference, a tile sweep, then the compiled reference, whose compiles are slowest).
Exits 0 with a message where there is no CUDA device or no triton.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ["mxint8", "mxint4", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "nvfp4"]


def load_formats():
    """``mpqc.formats`` from this checkout, without executing ``mpqc/__init__.py``."""
    if "mpqc" not in sys.modules:
        stub = types.ModuleType("mpqc")
        stub.__path__ = [str(ROOT / "mpqc")]
        sys.modules["mpqc"] = stub
    return importlib.import_module("mpqc.formats")


def bits(t: torch.Tensor) -> torch.Tensor:
    t = torch.where(torch.isnan(t), torch.tensor(float("nan"), dtype=t.dtype, device=t.device), t)
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def cuda_time(fn, repeats: int, inner: int) -> float:
    """Median seconds per call over ``repeats`` batches of ``inner`` back-to-back calls
    (batched so that the host's launch time hides behind the GPU's work)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


def say(*args) -> None:
    print(*args, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--formats", default=",".join(PRESETS))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--skip-reference", action="store_true", help="do not time the plain-PyTorch reference")
    ap.add_argument("--skip-compiled", action="store_true", help="do not time the torch.compile'd reference")
    ap.add_argument("--no-tune", action="store_true", help="skip the blocks-per-program x num_warps sweep")
    ap.add_argument("--json", default=None, help="also write every row here")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        say("quantize_gpu: no CUDA device here; nothing to measure (run it on a GPU machine).")
        return 0
    formats = load_formats()
    from mpqc.formats import kernels
    from mpqc.formats.reference import quantize_reference

    if not kernels.triton_available():
        say(f"quantize_gpu: triton does not import ({kernels._triton_module()}); nothing to measure.")
        return 0
    import triton

    from mpqc.formats import triton_quantize

    say(
        f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"x: {args.size} x {args.size}, median of {args.repeats}"
    )
    rows: list[dict] = []
    names = args.formats.split(",")
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(args.size, args.size, generator=g, device="cuda")
    base *= torch.exp2(torch.randint(-6, 6, base.shape, generator=g, device="cuda").float())

    def row(dtype, name, path, seconds, copy_s, **extra):
        x_bytes = base.numel() * torch.empty((), dtype=dtype).element_size()
        tbps = 2 * x_bytes / seconds / 1e12
        r = {
            "dtype": str(dtype).replace("torch.", ""),
            "format": name,
            "path": path,
            "ms": seconds * 1e3,
            "TB/s": tbps,
            "x copy bandwidth": copy_s / seconds,
            **extra,
        }
        rows.append(r)
        tail = " ".join(f"{k}={v}" for k, v in extra.items())
        say(
            f"{r['dtype']:<9} {name:<11} {path:<9} {r['ms']:>9.3f} ms {tbps:>7.3f} TB/s "
            f"{r['x copy bandwidth']:>7.3f} x copy  {tail}"
        )

    def per_dtype(dtype):
        x = base.to(dtype)
        copy_s = cuda_time(x.clone, args.repeats, 10)
        return x, copy_s

    say("\n== copy, Triton kernels, bit-equality with the reference ==")
    copies = {}
    for dtype in dtypes:
        x, copy_s = per_dtype(dtype)
        copies[dtype] = copy_s
        row(dtype, "-", "copy", copy_s, copy_s)
        for name in names:
            fmt = formats.FORMATS[name]
            block = fmt.block_size
            got = triton_quantize.quantize_triton(x, fmt, block, 1, "nearest")
            want = quantize_reference(x, fmt, block, 1, "nearest")
            diff = int((bits(got) != bits(want)).sum())
            del want
            t = cuda_time(lambda: triton_quantize.quantize_triton(x, fmt, block, 1, "nearest"), args.repeats, 10)
            row(dtype, name, "triton", t, copy_s, bit_equal=diff == 0, differing=diff)
        del x

    if not args.skip_reference:
        say("\n== plain-PyTorch reference ==")
        for dtype in dtypes:
            x = base.to(dtype)
            for name in names:
                fmt = formats.FORMATS[name]
                t = cuda_time(
                    lambda: quantize_reference(x, fmt, fmt.block_size, 1, "nearest"), max(3, args.repeats // 3), 1
                )
                row(dtype, name, "reference", t, copies[dtype])
            del x

    if not args.no_tune:
        say("\n== tile sweep (mxint4, block 32): blocks per program x num_warps ==")
        fmt = formats.FORMATS["mxint4"]
        for dtype in dtypes:
            x = base.to(dtype)
            for g_blocks in (32, 64, 128, 256, 512):
                for warps in (4, 8, 16):
                    t = cuda_time(
                        lambda: triton_quantize.quantize_triton(
                            x, fmt, 32, 1, "nearest", blocks_per_program=g_blocks, num_warps=warps
                        ),
                        args.repeats,
                        10,
                    )
                    row(dtype, "mxint4", "sweep", t, copies[dtype], blocks_per_program=g_blocks, num_warps=warps)
            del x

    if not args.skip_compiled:
        say("\n== reference compiled by torch.compile (TorchInductor) ==")
        for dtype in dtypes:
            x = base.to(dtype)
            for name in names:
                fmt = formats.FORMATS[name]
                t0 = time.perf_counter()
                kernels.quantize_compiled(x, fmt, fmt.block_size, 1, "nearest")
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                t = cuda_time(lambda: kernels.quantize_compiled(x, fmt, fmt.block_size, 1, "nearest"), args.repeats, 5)
                row(dtype, name, "compiled", t, copies[dtype], first_call_s=round(first, 1))
            del x

    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
