"""llama.cpp's types in mpqc: bits per weight (every scale and minimum included), the activation
format llama.cpp's CPU kernels pair with each, and the quantization error on Gaussian weights.

    python benchmarks/gguf_types.py [--rows 256] [--cols 4096] [--seed 0]
"""

from __future__ import annotations

import argparse
import json

import torch

import mpqc
from mpqc.formats.packing import gguf_type_name
from mpqc.targets import llamacpp_activation

NAMES = ["q8_0", "q6_k", "q5_1", "q5_k", "q5_0", "q4_1", "q4_k", "q4_0", "mxint8", "mxint4", "mxfp4"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    w = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(args.seed))
    rows = []
    for name in NAMES:
        fmt = mpqc.formats.get_format(name)
        q = mpqc.formats.quantize(w, name)
        rows.append(
            {
                "format": name,
                "gguf_type": gguf_type_name(fmt),
                "block": fmt.block_size,
                "bits_per_weight": fmt.bits_per_element,
                "llamacpp_activation": llamacpp_activation(fmt).name,
                "relative_mse": float((q - w).pow(2).mean() / w.pow(2).mean()),
            }
        )
    print(json.dumps(rows))
    print("| mpqc format | GGUF type | block | bits/weight | llama.cpp activations | relative MSE, N(0,1) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['format']} | {r['gguf_type']} | {r['block']} | {r['bits_per_weight']:.4g} | "
            f"{r['llamacpp_activation']} | {r['relative_mse']:.3e} |"
        )


if __name__ == "__main__":
    main()
