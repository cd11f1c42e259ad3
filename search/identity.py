"""A study's identity: everything its numbers depend on, so that one study never mixes two searches.

``SearchConfig.study_settings`` names the search's own settings (the model's structure, the
budget, the formats, the window settings); ``measured`` adds what those settings are applied
to: the weights (``mpqc.fingerprint.weights``, a hash of a fixed sample of every tensor and
the shapes), the token stream the windows are cut from, the dtype and the device type. A
stored study whose identity differs in any field is refused, and the error names the field;
the default study name ends in a digest of the whole identity, so a search of another
checkpoint, text or dtype gets a study of its own unless a name is forced.

Studies stored before the identity had these fields are refused (``identity`` is missing
from them): start a new study, or pass another ``study_name``.
"""

from __future__ import annotations

import hashlib
import json

import torch

from mpqc import fingerprint
from mpqc.graph import Graph

IDENTITY_VERSION = 2  # bump when a field joins the identity: older studies are then refused, not mixed

# What each stored field stands for, for the error that names a differing one.
FIELDS = {
    "identity": "the version of mpqc's study identity (a study stored by an older mpqc)",
    "graph": "the model's structure (class, matmul names and sizes)",
    "weights": "the model's weights (a hash of a sample of every tensor)",
    "tokens": "the text's token stream (hash and length of the search part)",
    "dtype": "the model's dtype",
    "device": "the device type",
    "budget": "the budget",
    "granularity": "the granularity",
    "low": "the low precision",
    "high": "the high precision",
    "block_size": "the block size",
    "rounding": "the rounding mode",
    "seq_len": "the window length",
    "n_samples": "the number of windows",
    "seed": "the seed of the windows",
    "prefix": "the tokens every window starts with",
    "multi_objective": "single- or multi-objective",
    "objective": "the objective",
}


def measured(graph: Graph, tokens: torch.Tensor) -> dict:
    """The identity fields beyond the search's settings: weights, text, dtype, device."""
    return {
        "identity": IDENTITY_VERSION,
        "weights": fingerprint.weights(graph.module),
        "tokens": {"sha256": fingerprint.tokens(tokens), "n": int(tokens.numel())},
        "dtype": str(graph.dtype).removeprefix("torch."),
        "device": graph.device.type,
    }


def digest(settings: dict) -> str:
    """A short hash of a whole identity (the end of the default study name)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def differences(stored: dict, asked: dict) -> list[str]:
    """One line per differing field: its name, what it stands for, the stored and the asked value."""
    keys = set(stored) | set(asked)
    lines = []
    for key in [k for k in FIELDS if k in keys] + sorted(keys - set(FIELDS)):
        if stored.get(key) != asked.get(key):
            meaning = FIELDS.get(key, "a setting")
            lines.append(f"{key} ({meaning}): stored {_short(stored.get(key))}, asked {_short(asked.get(key))}")
    return lines


def _short(value) -> str:
    text = "(absent)" if value is None else json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."
