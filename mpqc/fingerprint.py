"""Fingerprints of what a number depends on: a model's structure, its weights, a token stream.

``structure`` names the architecture a plan or a study was made for (the model class and
every matmul's name and size); two checkpoints of one architecture share it. ``weights``
tells the checkpoints apart: a hash of a fixed sample of every parameter and buffer plus
the shapes and dtypes, cheap enough to compute on every search (about 20 ms for SmolLM2's
272 tensors) and different for any two checkpoints that differ in a sampled element.
``tokens`` hashes a token stream exactly. Each is a short hex digest.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["SAMPLES_PER_TENSOR", "structure", "tokens", "weights"]

SAMPLES_PER_TENSOR = 4096  # evenly spaced elements of each tensor, first and last included
_DIGEST_CHARS = 16


def _digest(h) -> str:
    return h.hexdigest()[:_DIGEST_CHARS]


def structure(graph) -> str:
    """The model class and every matmul's name and parameter count (what a plan refers to)."""
    names = "\n".join(f"{m.name}:{m.params}" for m in graph.matmuls)
    return _digest(hashlib.sha256(f"{graph.model_class}\n{names}".encode()))


def _sample(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n > SAMPLES_PER_TENSOR:
        # evenly spaced, in integers: float32 positions round past the end of large tensors
        step = torch.arange(SAMPLES_PER_TENSOR, dtype=torch.int64, device=flat.device)
        flat = flat[step * (n - 1) // (SAMPLES_PER_TENSOR - 1)]
    flat = flat.cpu().contiguous()
    return (flat.to(torch.uint8) if flat.dtype == torch.bool else flat).view(torch.uint8).numpy().tobytes()


def weights(module: torch.nn.Module) -> str:
    """A hash of every parameter and buffer of ``module``: name, shape, dtype and a fixed sample."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict(keep_vars=True).items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        if t.numel():
            h.update(_sample(t))
    return _digest(h)


def tokens(stream: torch.Tensor) -> str:
    """A hash of a token stream's ids (all of them, in order)."""
    ids = stream.detach().reshape(-1).to(device="cpu", dtype=torch.long).contiguous()
    return _digest(hashlib.sha256(ids.numpy().tobytes()))
