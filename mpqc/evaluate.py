"""Perplexity of a causal LM on sampled windows of a token stream.

Windows are ``seq_len`` consecutive tokens whose starts are multiples of
``seq_len`` (so no two overlap), chosen at random with a seeded generator: the
same stream, ``seq_len`` and seed always give the same windows, and the first k
windows for ``n_samples=n`` are the windows for ``n_samples=k``. The model reads
a whole window and is scored on predicting its tokens 2..seq_len, so each
window contributes ``seq_len - 1`` predictions. A search that scores many plans
should call :func:`sample_windows` once and pass the windows to :func:`nll` or
:func:`perplexity` each time.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = [
    "check_windows_fit",
    "max_windows",
    "nll",
    "perplexity",
    "perplexity_of",
    "running_nll",
    "sample_windows",
    "window_nlls",
]

# math.exp overflows (OverflowError) past ~709.78: code that exponentiates a loss or a loss
# difference caps its argument at, or compares it with, this one constant.
EXP_LIMIT = 709.0


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_stream(tokens) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dim() != 1:
        raise ValueError(
            f"tokens must be a 1-D token stream, got shape {tuple(tokens.shape)}; "
            "pass windows from sample_windows() as `windows=` instead"
        )
    if tokens.dtype != torch.long:
        raise TypeError(f"tokens must have dtype torch.long (int64), got {tokens.dtype}")
    return tokens


def _check_windows(windows) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise ValueError("windows must be a [n, seq_len] torch.long tensor, as sample_windows() returns")
    if windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows of shape {tuple(windows.shape)} hold no token to predict")


def max_windows(n_tokens: int, seq_len: int, prefix_len: int = 0) -> int:
    """How many non-overlapping windows of ``seq_len`` tokens (``prefix_len`` of them a fixed
    prefix, the rest from the stream) a stream of ``n_tokens`` holds: what ``sample_windows`` can draw."""
    body = seq_len - prefix_len
    return n_tokens // body if body > 0 else 0


def check_windows_fit(tokens: torch.Tensor, seq_len: int, n_samples: int, prefix: Sequence[int] = (), *, part: str):
    """Raise a ValueError naming the largest count that fits when ``n_samples`` windows do not fit
    in ``tokens`` (``part``: which text it is, e.g. "the search part (the first 90%) of the text")."""
    fits = max_windows(int(tokens.numel()), seq_len, len(prefix))
    if n_samples > fits:
        raise ValueError(
            f"{n_samples} windows of {seq_len} tokens do not fit in {part} ({tokens.numel():,} tokens): "
            f"at most {fits} fit; ask for at most {fits}, a shorter window, or more text"
        )


def sample_windows(
    tokens: torch.Tensor, seq_len: int = 512, n_samples: int = 64, seed: int = 0, prefix: Sequence[int] = ()
) -> torch.Tensor:
    """``n_samples`` non-overlapping windows of ``seq_len`` tokens, as [n, seq_len].

    ``prefix``: token ids every window starts with, before ``seq_len - len(prefix)`` tokens of
    the stream: what the tokenizer puts before any text (``mpqc.data.text_prefix``), e.g. the
    BOS token that Gemma and Llama 3 models are never run without."""
    _check_stream(tokens)
    _positive_int("seq_len", seq_len)
    _positive_int("n_samples", n_samples)
    prefix = [int(t) for t in prefix]
    if seq_len - len(prefix) < 2:
        raise ValueError(
            f"seq_len must be at least 2 + the {len(prefix)} prefix tokens: a window needs a "
            f"token to predict, got seq_len={seq_len}"
        )
    body = seq_len - len(prefix)
    available = tokens.numel() // body
    if n_samples > available:
        raise ValueError(
            f"{n_samples} windows of {body} tokens do not fit in a stream of "
            f"{tokens.numel()} tokens: at most {available} non-overlapping windows fit; "
            "lower n_samples or seq_len, or use more text"
        )
    generator = torch.Generator().manual_seed(int(seed))
    # randperm prefix: distinct slots, and nested in n_samples.
    slots = torch.randperm(available, generator=generator)[:n_samples]
    starts = slots * body
    windows = tokens[starts[:, None] + torch.arange(body)]
    if prefix:
        windows = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(n_samples, -1), windows], dim=1)
    return windows


def model_device(model) -> torch.device:
    # A plain callable (no parameters) gets its windows on the CPU.
    if not isinstance(model, torch.nn.Module):
        return torch.device("cpu")
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    # A Hugging Face model wants use_cache=False (no KV cache to build for one
    # pass) and returns an output object; a compiled mpqc module takes only
    # input_ids and returns the logits tensor.
    from transformers import PreTrainedModel

    out = model(input_ids, use_cache=False) if isinstance(model, PreTrainedModel) else model(input_ids)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"model returned {type(out).__name__}; expected a logits tensor or an object with a .logits tensor"
        )
    if logits.shape[:2] != input_ids.shape or logits.dim() != 3:
        raise ValueError(
            f"model returned logits of shape {tuple(logits.shape)} for input of shape "
            f"{tuple(input_ids.shape)}; expected [batch, seq_len, vocab]"
        )
    return logits


def nll(
    model,
    tokens: torch.Tensor | None = None,
    *,
    windows: torch.Tensor | None = None,
    seq_len: int = 512,
    n_samples: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    prefix: Sequence[int] = (),
    progress: bool = True,
) -> float:
    """Mean negative log-likelihood (nats per predicted token) over sampled windows.

    Pass a 1-D ``tokens`` stream (windows are sampled with ``seq_len``,
    ``n_samples``, ``seed`` and ``prefix``) or ready ``windows`` [n, seq_len] from
    :func:`sample_windows`, not both.
    """
    if (tokens is None) == (windows is None):
        raise ValueError("pass exactly one of `tokens` (a 1-D stream) or `windows` ([n, seq_len])")
    _positive_int("batch_size", batch_size)
    if windows is None:
        windows = sample_windows(tokens, seq_len, n_samples, seed, prefix)
    else:
        _check_windows(windows)

    with _eval_mode(model):
        total, count = _sum_nll(model, windows, batch_size, progress)
    # Non-finite logits give inf or nan here, returned as they are: a broken
    # plan is a measured result, not an error.
    return total / count


def running_nll(model, windows: torch.Tensor, *, batch_size: int = 8, steps: int = 1) -> Iterator[float]:
    """The mean NLL over the windows evaluated so far, after each of ``steps`` runs of whole
    batches (fewer when there are fewer batches: ``min(steps, n_batches)``). The last value is over all windows and equals ``nll(model, windows=windows)`` to
    the bit (the same batches, summed in the same order), so a search can stop a trial early
    on the first values and still score a finished one exactly as before."""
    _positive_int("batch_size", batch_size)
    _positive_int("steps", steps)
    n_batches = -(-windows.shape[0] // batch_size)
    steps = min(steps, n_batches)  # at most one value per batch; ceil keeps the ends distinct
    ends = {-(-(k + 1) * n_batches // steps) for k in range(steps)}
    with _eval_mode(model):
        for batch, (total, count) in enumerate(_running_sums(model, windows, batch_size, False), start=1):
            if batch in ends:
                yield total.item() / count


@contextlib.contextmanager
def _eval_mode(model):
    # Dropout would make the number random: evaluate in eval mode, then restore.
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _sum_nll(model, windows, batch_size, progress) -> tuple[float, int]:
    *_, (total, count) = _running_sums(model, windows, batch_size, progress)  # the sums after the last batch
    return total.item(), count


def _running_sums(model, windows, batch_size, progress) -> Iterator[tuple[torch.Tensor, int]]:
    """(summed NLL, predicted tokens) after each batch; the sum is updated in place."""
    total, count = None, 0
    for row_sums in _window_sums(model, windows, batch_size, progress):
        if total is None:
            # float64 accumulation, on the model's device so a GPU run never waits on .item().
            total = torch.zeros((), dtype=torch.float64, device=row_sums.device)
        for row_sum in row_sums:  # one window at a time, in order: the same sums as always
            total += row_sum
        count += row_sums.numel() * (windows.shape[1] - 1)
        yield total, count


def _window_sums(model, windows, batch_size, progress) -> Iterator[torch.Tensor]:
    """Each batch's summed NLL per window (float64, on the model's device)."""
    device = model_device(model)
    batches = range(0, windows.shape[0], batch_size)
    with torch.no_grad():
        for start in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
            batch = windows[start : start + batch_size].to(device)
            logits = logits_of(model, batch)
            targets = batch[:, 1:]
            # One row at a time: a float32 copy of a whole batch's logits
            # (8 x 512 x 49k) would be another 800 MB.
            yield torch.stack(
                [
                    F.cross_entropy(logits[row, :-1].float(), targets[row], reduction="none").double().sum()
                    for row in range(batch.shape[0])
                ]
            )


def window_nlls(model, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """The mean NLL of each window (float64, [n], on the CPU): what a bootstrap over evaluation
    windows resamples. With windows of one length, as sample_windows() gives, their mean is
    ``nll(model, windows=windows)`` up to float rounding."""
    _positive_int("batch_size", batch_size)
    _check_windows(windows)
    with _eval_mode(model):
        sums = torch.cat(list(_window_sums(model, windows, batch_size, progress)))
    return sums.cpu() / (windows.shape[1] - 1)


def perplexity(
    model,
    tokens: torch.Tensor | None = None,
    *,
    windows: torch.Tensor | None = None,
    seq_len: int = 512,
    n_samples: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    prefix: Sequence[int] = (),
    progress: bool = True,
) -> float:
    """exp(mean NLL) over sampled windows; arguments as in :func:`nll`."""
    mean = nll(
        model,
        tokens,
        windows=windows,
        seq_len=seq_len,
        n_samples=n_samples,
        batch_size=batch_size,
        seed=seed,
        prefix=prefix,
        progress=progress,
    )
    return perplexity_of(mean)


def perplexity_of(mean_nll: float) -> float:
    """exp(mean NLL), inf past what a float holds; nan stays nan."""
    return math.inf if mean_nll > EXP_LIMIT else math.exp(mean_nll)
