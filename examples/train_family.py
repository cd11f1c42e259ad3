"""Train a family of Llama-style models of several sizes for the scaling-law sweeps.

No family of pretrained sizes reaches this machine (docs/scaling.md), so we train our own on
real text: the embedded Wikipedia sample (mpqc.data, about 480k words) or any text spec
mpqc.data accepts. One byte-level BPE tokenizer is trained on the text and shared by every
size; each model trains on the leading 90% of the token stream (``split_tokens``), so the
trailing 10% that the sweep evaluates on is never seen in training.

    python examples/train_family.py --out runs/family              # CPU: toy scale, a few minutes
    python examples/train_family.py --out runs/family --preset gpu  # CUDA: larger sizes, more steps

Each size is saved as a Hugging Face directory (``save_pretrained`` + the tokenizer) that
``mpqc.load_model`` and ``mpqc sweep`` load like any model, with ``train_log.json`` beside it.
Everything is seeded: the same seed, text and preset give the same weights on the same machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time

import torch

# name -> (hidden, layers, heads); intermediate = 8/3 hidden (Llama's ratio), rounded to 16.
PRESETS = {
    # About 12k to 845k parameters (73x) with a 512-token vocabulary: about three minutes on one CPU core.
    "toy": {
        "sizes": {"llama-xs": (16, 1, 2), "llama-s": (32, 2, 2), "llama-m": (64, 3, 4), "llama-l": (128, 4, 4)},
        "vocab": 512,
        "steps": 600,
        "batch": 8,
        "seq_len": 128,
        "lr": 3e-3,
        "lr_width": 64,
    },
    # About 0.6M to 63M parameters (100x) with an 8192-token vocabulary, for one GPU. The embedded
    # text is about a million tokens: pass a larger --text before reading much into the big sizes.
    "gpu": {
        "sizes": {
            "llama-xs": (64, 2, 2),
            "llama-s": (128, 4, 4),
            "llama-m": (256, 6, 4),
            "llama-l": (512, 8, 8),
            "llama-xl": (768, 8, 12),
        },
        "vocab": 8192,
        "steps": 2000,
        "batch": 32,
        "seq_len": 256,
        "lr": 1e-3,
        "lr_width": 256,
    },
}


def learning_rate(preset: dict, hidden: int) -> float:
    """The preset's rate up to ``lr_width``, falling as 1 / hidden beyond: Adam's best rate
    shrinks with width, and one rate for all sizes let the widest toy model (hidden 128, 3e-3)
    end worse than the next smaller one (held-out perplexity 53.7 against 45.3; 42.9 at 1e-3)."""
    return preset["lr"] * min(1.0, preset["lr_width"] / hidden)


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    layers: int
    heads: int


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer trained on ``text`` (deterministic for the same text)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [text], vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=["<|endoftext|>"]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def build_model(size: Size, vocab_size: int, seq_len: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    intermediate = 16 * max(1, round(8 * size.hidden / 3 / 16))
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden,
        intermediate_size=intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=max(seq_len, 512),
        tie_word_embeddings=True,  # tied: size grows with depth and width
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def train(
    model,
    tokens: torch.Tensor,
    *,
    steps: int,
    batch: int,
    seq_len: int,
    lr: float,
    seed: int,
    device: torch.device,
    log_every: int = 50,
) -> list[float]:
    """AdamW with linear warmup and cosine decay on random windows of ``tokens``; returns the losses."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(seed)  # the data order, apart from the initialization
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    losses = []
    for step in range(steps):
        starts = torch.randint(0, tokens.numel() - seq_len, (batch,), generator=gen)
        x = tokens[starts[:, None] + torch.arange(seq_len)].to(device)
        with autocast:
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}/{steps}: loss {sum(losses[-log_every:]) / log_every:.3f}", file=sys.stderr)
    return losses


def parse_sizes(text: str | None, preset: dict) -> list[Size]:
    """'name:hidden:layers:heads,...' or None for the preset's sizes."""
    if not text:
        return [Size(n, *dims) for n, dims in preset["sizes"].items()]
    sizes = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"--sizes entry {item!r} is not name:hidden:layers:heads, e.g. tiny:32:1:2")
        name, hidden, layers, heads = parts[0], *map(int, parts[1:])
        if hidden % heads:
            raise ValueError(f"--sizes entry {item!r}: hidden {hidden} is not a multiple of heads {heads}")
        sizes.append(Size(name, hidden, layers, heads))
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/family", help="folder for one Hugging Face directory per size")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="toy (CPU) or gpu; default: gpu when CUDA is available, else toy",
    )
    p.add_argument("--sizes", default=None, help="override the preset: name:hidden:layers:heads,...")
    p.add_argument("--text", default="wiki", help="mpqc.data text spec: wiki, a .txt file or folder, hf:NAME")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: small models gain little from more, a shared machine loses "
        "much, and a fixed count keeps the sums in the same order run to run)",
    )
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = dict(PRESETS[args.preset or ("gpu" if device.type == "cuda" else "toy")])
    for key in ("steps", "vocab", "batch", "seq_len"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    sizes = parse_sizes(args.sizes, preset)
    with _cpu_settings(device, args.threads):
        _train_family(args, preset, sizes, device)
    return 0


@contextlib.contextmanager
def _cpu_settings(device: torch.device, threads: int):
    """Fixed threads and deterministic kernels while training; the caller's settings after."""
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])


def _train_family(args, preset: dict, sizes: list[Size], device: torch.device) -> None:
    from mpqc.data import load_text, split_tokens, tokenize
    from mpqc.evaluate import perplexity
    from mpqc.io import write_json_atomic

    t0 = time.perf_counter()
    text = load_text(args.text)
    tokenizer = train_tokenizer(text, preset["vocab"])
    train_tokens, holdout = split_tokens(tokenize(tokenizer, text))  # the sweep's split: holdout never trained on
    print(
        f"text {args.text}: {train_tokens.numel():,} training tokens, {holdout.numel():,} held out; "
        f"tokenizer ({len(tokenizer)} tokens) in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )

    for i, size in enumerate(sizes):
        t0 = time.perf_counter()
        model = build_model(size, len(tokenizer), preset["seq_len"], seed=args.seed + i)
        params = sum(q.numel() for q in model.parameters())
        print(f"{size.name}: hidden {size.hidden}, {size.layers} layers, {params:,} parameters", file=sys.stderr)
        losses = train(
            model,
            train_tokens,
            steps=preset["steps"],
            batch=preset["batch"],
            seq_len=preset["seq_len"],
            lr=learning_rate(preset, size.hidden),
            seed=args.seed + 1000 + i,
            device=device,
        )
        model.eval()
        n_eval = min(16, holdout.numel() // preset["seq_len"])
        ppl = perplexity(model, holdout, seq_len=preset["seq_len"], n_samples=n_eval, seed=0, progress=False)
        path = os.path.join(args.out, size.name)
        model.to("cpu").save_pretrained(path)
        tokenizer.save_pretrained(path)
        log = {
            "size": dataclasses.asdict(size),
            "params": params,
            "preset": preset,
            "lr": learning_rate(preset, size.hidden),
            "text": args.text,
            "seed": args.seed,
            "device": str(device),
            "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
            "holdout_perplexity": ppl,
            "holdout_windows": n_eval,
            "seconds": time.perf_counter() - t0,
        }
        write_json_atomic(os.path.join(path, "train_log.json"), log)
        print(
            f"{size.name}: held-out perplexity {ppl:.2f} after {preset['steps']} steps in {log['seconds']:.0f} s "
            f"-> {path}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    sys.exit(main())
