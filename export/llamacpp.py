"""Perplexity of a GGUF file as llama.cpp itself computes it, on mpqc's windows.

    lm = mpqc.export.LlamaCppLM("model.gguf")
    lm.perplexity(windows=mpqc.evaluate.sample_windows(tokens, 512, 8))

llama.cpp comes from the ``xllamacpp`` wheel (the ``llamacpp`` extra), which ships llama.cpp's C
library inside its Python extension. Its own server API returns log-probabilities one generated
token at a time; the fastest exact route is llama.cpp's C API, the one its ``llama-perplexity``
tool uses: one ``llama_decode`` per window with every position's logits requested, then
``llama_get_logits``. That runs in a child process (``python -m mpqc.export.llamacpp``) with a
timeout: a crash or hang of the library (xllamacpp hung on interpreter exit while a server was
alive) cannot take the caller with it. Token ids go in as they are (llama.cpp's tokenizer
differs slightly from Hugging Face's), and windows are decoded one at a time: llama.cpp is not
batch-invariant, so compare mean NLL over many tokens, never single tokens.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

XLLAMACPP_VERSION = "2026.10.11549"  # llama.cpp b11549; the C structs read below are that build's
_INSTALL = f"pip install xllamacpp=={XLLAMACPP_VERSION}  (or mpqc[llamacpp])"


class LlamaCppError(RuntimeError):
    """llama.cpp could not load or run a file (its log is in the message)."""


class LlamaCppLM:
    """A GGUF file run by llama.cpp (CPU): mean NLL and perplexity of token windows."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, timeout: float = 600.0):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no GGUF file at {self.path}")
        self.threads = int(threads or min(os.cpu_count() or 1, 8))
        self.timeout = float(timeout)

    def window_nll(self, windows: torch.Tensor) -> torch.Tensor:
        """Per-window sum of NLL (nats) over predicting tokens 2..L of each window, float64 [n]."""
        windows = torch.as_tensor(windows, dtype=torch.long)
        if windows.dim() != 2 or windows.shape[1] < 2:
            raise ValueError(f"windows must be [n, seq_len >= 2] token ids, got shape {tuple(windows.shape)}")
        with tempfile.TemporaryDirectory(prefix="mpqc-llamacpp-") as tmp:
            src, out = os.path.join(tmp, "windows.npy"), os.path.join(tmp, "nll.npy")
            np.save(src, windows.numpy().astype(np.int32))
            cmd = [sys.executable, "-m", "mpqc.export.llamacpp", str(self.path), src, out, str(self.threads)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout)
            except subprocess.TimeoutExpired:
                raise LlamaCppError(f"llama.cpp on {self.path} did not finish within {self.timeout:.0f} s") from None
            if done.returncode != 0:
                tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
                raise LlamaCppError(f"llama.cpp failed on {self.path} (exit {done.returncode}):\n{tail}")
            return torch.from_numpy(np.load(out))

    def nll(self, windows: torch.Tensor) -> float:
        """Mean NLL per predicted token over ``windows``, as mpqc.evaluate.nll counts it."""
        sums = self.window_nll(windows)
        return float(sums.sum()) / (windows.shape[0] * (windows.shape[1] - 1))

    def perplexity(
        self, tokens: torch.Tensor | None = None, *, windows: torch.Tensor | None = None, **sampling
    ) -> float:
        """exp(mean NLL) over ``windows``, or over windows sampled from ``tokens`` as
        mpqc.evaluate.sample_windows does (seq_len, n_samples, seed, prefix)."""
        if windows is None:
            from mpqc.evaluate import sample_windows

            windows = sample_windows(tokens, **sampling)
        return math.exp(min(self.nll(windows), 709.0))


# ---- the child process: llama.cpp's C API through ctypes -------------------------------------------


class _Opaque(ctypes.Structure):
    """A C struct passed by value whose layout is read, not declared (larger than any of them)."""

    _fields_ = [("words", ctypes.c_uint64 * 128)]


class _Batch(ctypes.Structure):
    _fields_ = [
        ("n_tokens", ctypes.c_int32),
        ("token", ctypes.POINTER(ctypes.c_int32)),
        ("embd", ctypes.c_void_p),
        ("pos", ctypes.POINTER(ctypes.c_int32)),
        ("n_seq_id", ctypes.POINTER(ctypes.c_int32)),
        ("seq_id", ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))),
        ("logits", ctypes.POINTER(ctypes.c_int8)),
    ]


def _library():
    try:
        import xllamacpp
    except ImportError as e:
        raise LlamaCppError(f"llama.cpp is not installed ({e}); {_INSTALL}") from None
    lib = ctypes.CDLL(xllamacpp.xllamacpp.__file__)
    c_p = ctypes.c_void_p
    for name, restype, argtypes in [
        ("llama_model_default_params", _Opaque, []),
        ("llama_context_default_params", _Opaque, []),
        ("llama_model_load_from_file", c_p, [ctypes.c_char_p, _Opaque]),
        ("llama_init_from_model", c_p, [c_p, _Opaque]),
        ("llama_batch_init", _Batch, [ctypes.c_int32, ctypes.c_int32, ctypes.c_int32]),
        ("llama_decode", ctypes.c_int32, [c_p, _Batch]),
        ("llama_get_logits", ctypes.POINTER(ctypes.c_float), [c_p]),
        ("llama_get_memory", c_p, [c_p]),
        ("llama_memory_clear", None, [c_p, ctypes.c_bool]),
        ("llama_model_get_vocab", c_p, [c_p]),
        ("llama_vocab_n_tokens", ctypes.c_int32, [c_p]),
    ]:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    lib.llama_backend_init()
    return lib, xllamacpp.GGML_DEFAULT_N_THREADS


def _context_params(lib, default_threads: int, n_ctx: int, threads: int) -> _Opaque:
    """Default context params with n_ctx, n_batch, n_ubatch and the thread counts set, after
    checking the defaults sit where this build puts them (refusing any other layout)."""
    raw = bytearray(bytes(lib.llama_context_default_params()))
    words = np.frombuffer(raw, dtype=np.int32)
    if list(words[:4]) != [512, 2048, 512, 1]:
        raise LlamaCppError(f"unexpected llama_context_params layout in this xllamacpp; {_INSTALL}")
    at = next((i for i in range(4, 12) if words[i] == words[i + 1] == default_threads), None)
    if at is None:
        raise LlamaCppError(f"cannot find n_threads in llama_context_params of this xllamacpp; {_INSTALL}")
    words[0] = words[1] = words[2] = n_ctx
    words[at] = words[at + 1] = threads
    return _Opaque.from_buffer_copy(bytes(raw))


def _log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    z = logits.astype(np.float64)
    top = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - top).sum(axis=1)) + top[:, 0]
    return float((lse - z[np.arange(len(targets)), targets]).sum())


def _run(model_path: str, windows: np.ndarray, threads: int) -> np.ndarray:
    lib, default_threads = _library()
    model = lib.llama_model_load_from_file(model_path.encode(), lib.llama_model_default_params())
    if not model:
        raise LlamaCppError(f"llama.cpp could not load {model_path}")
    n, length = windows.shape
    ctx = lib.llama_init_from_model(model, _context_params(lib, default_threads, length, threads))
    if not ctx:
        raise LlamaCppError(f"llama.cpp could not make a context of {length} tokens for {model_path}")
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    if int(windows.max()) >= n_vocab or int(windows.min()) < 0:
        raise LlamaCppError(f"token ids outside the file's vocabulary of {n_vocab}")
    batch = lib.llama_batch_init(length, 0, 1)
    for i in range(length):
        batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = i, 1, 0, 1
    batch.n_tokens = length
    sums = np.zeros(n, dtype=np.float64)
    for w in range(n):
        for i in range(length):
            batch.token[i] = int(windows[w, i])
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        rc = lib.llama_decode(ctx, batch)
        if rc != 0:
            raise LlamaCppError(f"llama_decode returned {rc} on window {w}")
        logits = np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(length, n_vocab))
        sums[w] = _log_softmax_nll(logits[:-1], windows[w, 1:])
    return sums


def main(argv: list[str]) -> int:
    model_path, src, out, threads = argv
    sums = _run(model_path, np.load(src), int(threads))
    np.save(out, sums)
    sys.stdout.write(json.dumps({"windows": len(sums)}) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: the library's static destructors are not needed


if __name__ == "__main__":
    main(sys.argv[1:])
