"""The model family of the scaling-law studies: Llama-style sizes trained here, resumably.

No family of pretrained sizes reaches this machine (docs/scaling.md), so the studies train
their own. A :class:`Preset` names the sizes and how each trains: a fixed number of steps
(``toy``, ``gpu``) or training tokens matched to the parameters (``cpu-family``: a fixed
number of tokens per non-embedding parameter, capped at a number of passes over the corpus).
:func:`train_family` writes::

    <out>/corpus/            the corpus (mpqc.corpus) when the preset trains on it
    <out>/tokenizer/         one byte-level BPE tokenizer shared by every size
    <out>/family.json        the preset and every run's size, parameters, tokens and steps
    <out>/<run>/             one (size, training seed): checkpoint.pt while it trains (saved
                             atomically every ``checkpoint_every`` steps and when stopped);
                             when done the Hugging Face files and, last, train_log.json, the
                             completion marker (with the run's train_seed for sweeps)

A rerun skips finished runs and continues a partial one from its checkpoint; with the same
thread count and deterministic kernels (CPU) the weights equal an uninterrupted run's. A run
whose stored settings differ from the asked ones is an error, never silently reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from mpqc.io import atomic_file, write_json_atomic
from mpqc.models import parameter_counts

__all__ = [
    "PRESETS",
    "Preset",
    "RunPlan",
    "Size",
    "build_model",
    "cpu_settings",
    "estimate_budget",
    "learning_rate",
    "parameter_counts",
    "parse_sizes",
    "plan_runs",
    "train",
    "train_family",
    "train_tokenizer",
]

CHECKPOINT = "checkpoint.pt"
MARKER = "train_log.json"  # written last: a run with it is finished


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    layers: int
    heads: int
    batch: int | None = None  # sequences per step; None: the preset's

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"size {self.name}: hidden {self.hidden} is not a multiple of heads {self.heads}")

    @property
    def intermediate(self) -> int:
        return 16 * max(1, round(8 * self.hidden / 3 / 16))  # Llama's 8/3 hidden, rounded to 16


@dataclasses.dataclass(frozen=True)
class Preset:
    sizes: tuple[Size, ...]
    vocab: int
    batch: int
    seq_len: int
    lr: float
    lr_width: int  # the rate is lr up to this width and falls as 1 / hidden beyond
    steps: int | None = None  # the same number of steps for every size, or:
    tokens_per_param: float | None = None  # training tokens = this x non-embedding parameters,
    max_epochs: float = 1.0  # capped at this many passes over the training tokens
    seeds: tuple[int, ...] | None = None  # training seeds; None: the caller's one seed
    corpus: bool = False  # train on mpqc.corpus's train split (else the leading 90% of a text)
    checkpoint_every: int = 200

    def __post_init__(self):
        if (self.steps is None) == (self.tokens_per_param is None):
            raise ValueError("a preset gives either steps or tokens_per_param, not both or neither")


def _sizes(**dims) -> tuple[Size, ...]:
    return tuple(Size(name, *d) for name, d in dims.items())


PRESETS = {
    # About 12k to 845k parameters (73x) with a 512-token vocabulary: about three minutes on one CPU core.
    "toy": Preset(
        sizes=_sizes(**{"llama-xs": (16, 1, 2), "llama-s": (32, 2, 2), "llama-m": (64, 3, 4), "llama-l": (128, 4, 4)}),
        vocab=512,
        batch=8,
        seq_len=128,
        lr=3e-3,
        lr_width=64,
        steps=600,
    ),
    # About 0.6M to 63M parameters (100x) with an 8192-token vocabulary, for one GPU. The embedded
    # text is about a million tokens: pass a larger text before reading much into the big sizes.
    "gpu": Preset(
        sizes=_sizes(
            **{
                "llama-xs": (64, 2, 2),
                "llama-s": (128, 4, 4),
                "llama-m": (256, 6, 4),
                "llama-l": (512, 8, 8),
                "llama-xl": (768, 8, 12),
            }
        ),
        vocab=8192,
        batch=32,
        seq_len=256,
        lr=1e-3,
        lr_width=256,
        steps=2000,
    ),
    # Six sizes, 3.4k to 443k non-embedding parameters (2.1 decades), three training seeds each,
    # every one trained on 20 tokens per non-embedding parameter (at most 4 passes over the
    # corpus's train split, which no size here needs). A seventh size of 1.17M (128 x 6) would
    # get only 8.3 tokens per parameter from this corpus and cost 2.6 of the 4 CPU hours
    # (docs/scaling.md has the table and the measured budget): unmatched, it is left out. Smaller
    # batches for the small sizes give them a few hundred steps at least.
    "cpu-family": Preset(
        sizes=(
            Size("fam-1", 24, 1, 2, batch=2),
            Size("fam-2", 32, 2, 2, batch=4),
            Size("fam-3", 48, 3, 4, batch=8),
            Size("fam-4", 64, 4, 4, batch=16),
            Size("fam-5", 96, 4, 4, batch=16),
            # last: a run's seeds follow its size's place in this tuple, and fam-1..fam-5 were
            # trained before fam-0 joined (it took the place of a 128 x 6 size never trained)
            Size("fam-0", 16, 1, 2, batch=1),
        ),
        vocab=2048,
        batch=8,
        seq_len=128,
        lr=3e-3,
        lr_width=64,
        tokens_per_param=20.0,
        max_epochs=4.0,
        seeds=(0, 1, 2),
        corpus=True,
        checkpoint_every=200,
    ),
}


def learning_rate(preset: Preset, hidden: int) -> float:
    """The preset's rate up to ``lr_width``, falling as 1 / hidden beyond: Adam's best rate
    shrinks with width, and one rate for all sizes let the widest toy model (hidden 128, 3e-3)
    end worse than the next smaller one (held-out perplexity 53.7 against 45.3; 42.9 at 1e-3)."""
    return preset.lr * min(1.0, preset.lr_width / hidden)


def parse_sizes(text: str | None, preset: Preset) -> tuple[Size, ...]:
    """'name:hidden:layers:heads,...' or None for the preset's sizes."""
    if not text:
        return preset.sizes
    sizes = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"--sizes entry {item!r} is not name:hidden:layers:heads, e.g. tiny:32:1:2")
        try:
            sizes.append(Size(parts[0], *map(int, parts[1:])))
        except ValueError as e:
            raise ValueError(f"--sizes entry {item!r}: {e}") from None
    return tuple(sizes)


# ------------------------------------------------------------------------------ models


def build_model(size: Size, vocab_size: int, seq_len: int, seed: int, device: str | torch.device = "cpu"):
    """A Llama with tied embeddings, initialized from ``seed`` (on "meta": shapes only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
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
    with torch.device(device):
        return LlamaForCausalLM(config)


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


@contextlib.contextmanager
def cpu_settings(device: torch.device, threads: int):
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


# ---------------------------------------------------------------------------- training


def _optimizer(model, lr: float, steps: int):
    """AdamW with linear warmup (the first 5% of steps) and cosine decay to zero."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    return opt, sched


def _step(model, opt, sched, x: torch.Tensor, device: torch.device) -> float:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        loss = model(input_ids=x, labels=x, use_cache=False).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss.item()


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_file(path, "wb") as f:  # a kill mid-save leaves the previous checkpoint
        torch.save(state, f)


def _check_identity(stored: dict, asked: dict, where: Path) -> None:
    differ = sorted(k for k in set(stored) | set(asked) if stored.get(k) != asked.get(k))
    if differ:
        detail = "; ".join(f"{k}: stored {stored.get(k)!r}, asked {asked.get(k)!r}" for k in differ)
        raise ValueError(
            f"{where} was made with other settings ({detail}); give another --out, or delete it to start over"
        )


@dataclasses.dataclass
class TrainOutcome:
    losses: list[float]
    finished: bool  # False: stopped early, with a checkpoint to continue from
    resumed_at: list[int]  # the steps at which earlier calls stopped
    seconds: float  # training time summed over every call


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
    checkpoint: Path | None = None,
    checkpoint_every: int = 0,
    identity: dict | None = None,
    stop_at: int | None = None,
    deadline: float | None = None,
    log_every: int = 50,
) -> TrainOutcome:
    """AdamW with warmup and cosine decay on random windows of ``tokens`` (``seed``: their order).

    With ``checkpoint`` the whole state (weights, optimizer, schedule, the window generator,
    losses) is saved there every ``checkpoint_every`` steps and when the call stops early: at
    step ``stop_at`` or after the ``time.monotonic()`` ``deadline``. A later call with the same
    ``checkpoint`` (and ``identity``, checked) continues where it stopped."""
    model.to(device).train()
    opt, sched = _optimizer(model, lr, steps)
    gen = torch.Generator().manual_seed(seed)  # the data order, apart from the initialization
    losses, resumed_at, seconds, start = [], [], 0.0, 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True, map_location=device)
        _check_identity(state["identity"], identity or {}, checkpoint)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        losses, resumed_at, seconds, start = (
            state["losses"],
            [*state["resumed_at"], state["step"]],
            state["seconds"],
            state["step"],
        )

    def save(step: int) -> None:
        state = {"identity": identity or {}, "step": step, "losses": losses, "resumed_at": resumed_at}
        state |= {"seconds": seconds + time.perf_counter() - t0, "generator": gen.get_state()}
        state |= {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
        _save_checkpoint(checkpoint, state)

    t0 = time.perf_counter()
    for step in range(start, steps):
        if (stop_at is not None and step >= stop_at) or (deadline and step > start and time.monotonic() > deadline):
            if checkpoint is not None and step > start:
                save(step)
            return TrainOutcome(losses, False, resumed_at, seconds + time.perf_counter() - t0)
        starts = torch.randint(0, tokens.numel() - seq_len, (batch,), generator=gen)
        losses.append(_step(model, opt, sched, tokens[starts[:, None] + torch.arange(seq_len)].to(device), device))
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save(step + 1)
        if log_every and (step + 1) % log_every == 0:
            rate = (step + 1 - start) / (time.perf_counter() - t0)
            print(
                f"  step {step + 1}/{steps}: loss {sum(losses[-log_every:]) / log_every:.3f}, "
                f"{rate:.2f} steps/s, {(steps - step - 1) / rate / 60:.1f} min left",
                file=sys.stderr,
            )
    return TrainOutcome(losses, True, resumed_at, seconds + time.perf_counter() - t0)


# ------------------------------------------------------------------------------- plans


@dataclasses.dataclass(frozen=True)
class RunPlan:
    name: str  # the run's directory under the family folder
    size: Size
    size_index: int
    train_seed: int
    params: int
    non_embedding: int
    batch: int
    steps: int
    tokens: int  # steps x batch x seq_len
    tokens_matched: int | None  # tokens_per_param x non-embedding parameters, before the cap
    capped: bool  # the corpus cap cut the matched tokens
    lr: float
    init_seed: int
    data_seed: int


def _run_seeds(train_seed: int, size_index: int, seeded: bool) -> tuple[int, int]:
    # One-seed runs keep the seeds they always had (seed + size, seed + 1000 + size), so earlier
    # toy families retrain to the same weights; seeded runs space the seeds so no two collide.
    base = 10_000 * train_seed if seeded else train_seed
    return base + size_index, base + 1000 + size_index


def plan_runs(preset: Preset, vocab: int, train_tokens: int, seeds: tuple[int, ...], seeded: bool) -> list[RunPlan]:
    """Every (size, seed) run: parameters, steps and tokens (matched per parameter, or fixed steps)."""
    plans = []
    cap = int(preset.max_epochs * train_tokens)
    for i, size in enumerate(preset.sizes):
        counts = parameter_counts(build_model(size, vocab, preset.seq_len, seed=0, device="meta"))
        batch = size.batch or preset.batch
        per_step = batch * preset.seq_len
        matched = None if preset.tokens_per_param is None else round(preset.tokens_per_param * counts["non_embedding"])
        steps = preset.steps if matched is None else max(1, round(min(matched, cap) / per_step))
        for seed in seeds:
            init_seed, data_seed = _run_seeds(seed, i, seeded)
            plans.append(
                RunPlan(
                    name=f"{size.name}-seed{seed}" if seeded else size.name,
                    size=size,
                    size_index=i,
                    train_seed=seed,
                    params=counts["total"],
                    non_embedding=counts["non_embedding"],
                    batch=batch,
                    steps=steps,
                    tokens=steps * per_step,
                    tokens_matched=matched,
                    capped=matched is not None and matched > cap,
                    lr=learning_rate(preset, size.hidden),
                    init_seed=init_seed,
                    data_seed=data_seed,
                )
            )
    return plans


# -------------------------------------------------------------------------------- data


@dataclasses.dataclass
class FamilyData:
    tokenizer: object
    train: torch.Tensor  # what every model trains on
    heldout: torch.Tensor  # what no model trains on
    source: dict  # what the text was: the corpus manifest's hashes, or the text spec and its hash


def _tokenizer_for(folder: Path, text_for_training, vocab: int, source: dict):
    """The family's tokenizer: the one saved in ``folder`` (made from the same source and vocab,
    checked), else one trained on ``text_for_training()`` and saved there."""
    from transformers import PreTrainedTokenizerFast

    made_from = {"source": source, "vocab": vocab}
    record = folder / "mpqc_tokenizer.json"
    if record.is_file():
        _check_identity(json.loads(record.read_text()), made_from, folder)
        return PreTrainedTokenizerFast.from_pretrained(folder)
    tokenizer = train_tokenizer(text_for_training(), vocab)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    write_json_atomic(tmp / record.name, made_from)
    shutil.rmtree(folder, ignore_errors=True)  # only an unrecorded (half-made) one can be here
    os.replace(tmp, folder)
    return tokenizer


def corpus_data(out: Path, vocab: int, corpus_dir: Path | None = None, corpus_paths: dict | None = None) -> FamilyData:
    """The corpus's train and held-out splits, tokenized with a tokenizer trained on train alone.

    ``corpus_dir``: a corpus built before (used as it is), or where to build one from every
    source (default ``<out>/corpus``; ``corpus_paths`` as in ``build_corpus``)."""
    from mpqc.corpus import build_corpus, corpus_text, load_manifest, tokenize_corpus

    manifest = load_manifest(corpus_dir) if corpus_dir is not None else None
    corpus_dir = corpus_dir or out / "corpus"
    if manifest is None:
        manifest = build_corpus(corpus_dir, paths=corpus_paths)
    source = {
        "corpus": {split: manifest["splits"][split]["sha256"] for split in ("train", "heldout")},
        "used": [s for s, e in manifest["sources"].items() if e["status"] == "used"],
    }
    tokenizer = _tokenizer_for(out / "tokenizer", lambda: corpus_text(corpus_dir, "train"), vocab, source)
    streams = tokenize_corpus(corpus_dir, tokenizer)
    return FamilyData(tokenizer, streams["train"], streams["heldout"], {**source, "dir": str(corpus_dir)})


def text_data(out: Path, vocab: int, text_spec: str) -> FamilyData:
    """A text spec's leading 90% to train on and trailing 10% held out (``split_tokens``, the
    sweep's split); the tokenizer is trained on the whole text, as the toy family always was."""
    import hashlib

    from mpqc.data import load_text, split_tokens, tokenize

    text = load_text(text_spec)
    source = {"text": str(text_spec), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    tokenizer = _tokenizer_for(out / "tokenizer", lambda: text, vocab, source)
    train_tokens, heldout = split_tokens(tokenize(tokenizer, text))
    return FamilyData(tokenizer, train_tokens, heldout, source)


# -------------------------------------------------------------------------------- runs


def _identity(plan: RunPlan, preset: Preset, data: FamilyData) -> dict:
    """Everything that decides a run's weights (a stored run with another identity is not reused)."""
    from mpqc import fingerprint
    from mpqc.data import tokenizer_fingerprint

    return {
        "size": dataclasses.asdict(plan.size),
        "vocab": len(data.tokenizer),
        "tokenizer": tokenizer_fingerprint(data.tokenizer),
        "train_tokens": fingerprint.tokens(data.train),
        "steps": plan.steps,
        "batch": plan.batch,
        "seq_len": preset.seq_len,
        "lr": plan.lr,
        "init_seed": plan.init_seed,
        "data_seed": plan.data_seed,
        "train_seed": plan.train_seed,
    }


def train_run(
    out: Path, plan: RunPlan, preset: Preset, data: FamilyData, device: torch.device, **stop
) -> tuple[str, dict | None]:
    """One (size, seed): ("done", log) when already finished, ("trained", log) when finished now,
    ("stopped", None) when ``stop`` (``stop_at``, ``deadline``) ended it early, with a checkpoint."""
    from mpqc.evaluate import perplexity

    run_dir = out / plan.name
    identity = _identity(plan, preset, data)
    if (run_dir / MARKER).is_file():
        log = json.loads((run_dir / MARKER).read_text())
        if "identity" not in log:
            raise ValueError(
                f"{run_dir} was trained before runs recorded their settings, so it cannot be checked against "
                "these; give another --out, or delete it to retrain"
            )
        _check_identity(log["identity"], identity, run_dir)
        return "done", log
    model = build_model(plan.size, len(data.tokenizer), preset.seq_len, seed=plan.init_seed)
    print(
        f"{plan.name}: {plan.params:,} parameters ({plan.non_embedding:,} non-embedding), {plan.steps} steps",
        file=sys.stderr,
    )
    outcome = train(
        model,
        data.train,
        steps=plan.steps,
        batch=plan.batch,
        seq_len=preset.seq_len,
        lr=plan.lr,
        seed=plan.data_seed,
        device=device,
        checkpoint=run_dir / CHECKPOINT,
        checkpoint_every=preset.checkpoint_every,
        identity=identity,
        **stop,
    )
    if not outcome.finished:
        print(f"{plan.name}: stopped at step {len(outcome.losses)}; a rerun continues from there", file=sys.stderr)
        return "stopped", None
    model.eval()
    n_eval = min(16, data.heldout.numel() // preset.seq_len)
    ppl = perplexity(model, data.heldout, seq_len=preset.seq_len, n_samples=n_eval, seed=0, progress=False)
    model.to("cpu").save_pretrained(run_dir)
    data.tokenizer.save_pretrained(run_dir)
    log = {
        **_plan_row(plan),
        "identity": identity,
        "preset": _jsonable(preset),
        "text": data.source,
        "device": str(device),
        "torch": torch.__version__,
        "final_train_loss": sum(outcome.losses[-10:]) / len(outcome.losses[-10:]),
        "holdout_perplexity": ppl,
        "holdout_windows": n_eval,
        "resumed_at": outcome.resumed_at,
        "seconds": outcome.seconds,
    }
    write_json_atomic(run_dir / MARKER, log)  # last: the run is finished from here on
    (run_dir / CHECKPOINT).unlink(missing_ok=True)
    print(
        f"{plan.name}: held-out perplexity {ppl:.2f} after {plan.steps} steps, {outcome.seconds:.0f} s", file=sys.stderr
    )
    return "trained", log


def _jsonable(preset: Preset) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(preset)))


def _plan_row(plan: RunPlan) -> dict:
    row = dataclasses.asdict(plan)
    row["size"] = dataclasses.asdict(plan.size)
    row["tokens_per_param"] = plan.tokens / plan.non_embedding
    return row


def prepare(
    out: Path,
    preset: Preset,
    *,
    seeds: tuple[int, ...],
    seeded: bool,
    text: str | None = None,
    corpus_dir: Path | None = None,
    corpus_paths: dict | None = None,
) -> tuple[FamilyData, list[RunPlan]]:
    """The family's data and every run's plan; family.json records both."""
    if preset.corpus:
        data = corpus_data(out, preset.vocab, corpus_dir, corpus_paths)
    else:
        data = text_data(out, preset.vocab, text or "wiki")
    plans = plan_runs(preset, len(data.tokenizer), data.train.numel(), seeds, seeded)
    print(
        f"{data.train.numel():,} training tokens, {data.heldout.numel():,} held out; "
        f"tokenizer of {len(data.tokenizer)} tokens",
        file=sys.stderr,
    )
    write_json_atomic(
        out / "family.json",
        {
            "preset": _jsonable(preset),
            "text": data.source,
            "train_tokens": data.train.numel(),
            "heldout_tokens": data.heldout.numel(),
            "token_cap": int(preset.max_epochs * data.train.numel()),
            "runs": [_plan_row(p) for p in plans],
        },
    )
    return data, plans


def train_family(out, preset: Preset, *, seeds, seeded: bool, device, threads: int = 1, only=None, **options):
    """Train every run of ``preset`` (or the sizes named in ``only``) into ``out``; returns
    [(plan, status)]. ``options``: ``text``, ``corpus_dir``, ``corpus_paths`` (see :func:`prepare`),
    ``stop_at`` and ``deadline`` (see :func:`train`): runs after a deadline are not started."""
    out = Path(out)
    stop = {k: options.pop(k) for k in ("stop_at", "deadline") if k in options}
    with cpu_settings(device, threads):
        data, plans = prepare(out, preset, seeds=seeds, seeded=seeded, **options)
        results = []
        for plan in plans:
            if only and plan.size.name not in only:
                continue
            if (
                stop.get("deadline")
                and time.monotonic() > stop["deadline"]
                and not (out / plan.name / MARKER).is_file()
            ):
                results.append((plan, "not started"))
                continue
            status, _ = train_run(out, plan, preset, data, device, **stop)
            results.append((plan, status))
    return results


# ------------------------------------------------------------------------------ budget


def measure_step_seconds(
    size: Size, preset: Preset, vocab: int, batch: int, device: torch.device, *, steps: int = 5, warmup: int = 2
) -> float:
    """Seconds per training step of ``size``: the median of ``steps`` timed steps after ``warmup``
    (random tokens; the median, since other jobs on a shared machine slow some steps a lot)."""
    model = build_model(size, vocab, preset.seq_len, seed=0).to(device).train()
    opt, sched = _optimizer(model, 1e-3, 1000)
    x = torch.randint(0, vocab, (batch, preset.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    for _ in range(warmup):
        _step(model, opt, sched, x, device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        _step(model, opt, sched, x, device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def estimate_budget(
    plans: list[RunPlan], preset: Preset, vocab: int, device: torch.device, *, steps: int = 5
) -> list[dict]:
    """Per size: parameters, tokens, steps, measured seconds per step, and the estimated hours for
    one seed and for all of its seeds (eval and saving, a few seconds a run, left out)."""
    rows = []
    for size in preset.sizes:
        runs = [p for p in plans if p.size == size]
        if not runs:
            continue
        seconds = measure_step_seconds(size, preset, vocab, runs[0].batch, device, steps=steps)
        rows.append(
            {
                "size": size.name,
                "hidden": size.hidden,
                "layers": size.layers,
                "heads": size.heads,
                "params": runs[0].params,
                "non_embedding": runs[0].non_embedding,
                "batch": runs[0].batch,
                "steps": runs[0].steps,
                "tokens": runs[0].tokens,
                "tokens_per_param": runs[0].tokens / runs[0].non_embedding,
                "capped": runs[0].capped,
                "seeds": [p.train_seed for p in runs],
                "seconds_per_step": seconds,
                "hours_per_seed": seconds * runs[0].steps / 3600,
                "hours": seconds * runs[0].steps * len(runs) / 3600,
            }
        )
        print(
            f"{size.name}: {seconds * 1000:.1f} ms/step x {runs[0].steps} steps x {len(runs)} seeds = {rows[-1]['hours']:.2f} h",
            file=sys.stderr,
        )
    return rows
