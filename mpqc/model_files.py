"""What is wrong with a model's files, said before (or instead of) a loader's traceback.

``check`` runs before every load and costs a few reads: a GGUF file must start with the
GGUF magic; a Hugging Face directory must hold weights, and each safetensors file must be
as long as its own header says. ``diagnose`` runs after a loader failed and may take
seconds (it parses a GGUF's whole header and tensor table): it names a truncated file.
Each problem names the file, what is wrong with it and what to do.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

__all__ = ["ModelFileError", "check", "diagnose"]

GGUF_MAGIC = b"GGUF"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_AGAIN = "download, copy or save it again"


class ModelFileError(ValueError):
    """A model file or directory that cannot be loaded, with the reason and the remedy."""


def check(source) -> None:
    """Raise ``ModelFileError`` for a problem the cheap checks find (``source``: a ModelSource)."""
    problem = _gguf_magic(source) if source.gguf_file else _directory(source)
    if problem:
        raise ModelFileError(problem)


def diagnose(source) -> str | None:
    """The problem with ``source``'s files after a loader failed, or None if none is found."""
    if source.gguf_file:
        return _gguf_magic(source) or _gguf_tables(Path(source.path) / source.gguf_file)
    return _directory(source) or _config(Path(source.path))


# ---- GGUF ---------------------------------------------------------------------------------------


def _gguf_magic(source) -> str | None:
    path = Path(source.path) / source.gguf_file
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        what = "is empty" if not head else f"starts with {head!r}, not {GGUF_MAGIC!r}"
        return f"{path} is not a GGUF file: it {what}; pass a .gguf model file (or {_AGAIN})"
    return None


def _gguf_tables(path: Path) -> str | None:
    import gguf

    size = os.path.getsize(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception:  # noqa: BLE001 - a truncated file fails anywhere in the parse
        return f"{path} ({size:,} bytes) is truncated or corrupt: its header and tensor table cannot be read; {_AGAIN}"
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        return f"{path} is truncated: its tensors end at byte {end:,}, the file has {size:,} bytes; {_AGAIN}"
    return None


# ---- Hugging Face directories -------------------------------------------------------------------


def _directory(source) -> str | None:
    if source.kind != "directory":
        return None
    root = Path(source.path)
    present = [name for name in WEIGHT_FILES if (root / name).is_file()]
    shards = sorted(root.glob("*.safetensors"))
    if not present and not shards:
        return (
            f"model directory {root} has a config.json but no weights ({', '.join(WEIGHT_FILES)} or *.safetensors); "
            "save the model there with save_pretrained, or pass the directory that holds its weights"
        )
    for index in (n for n in present if n.endswith(".index.json")):
        problem = _index(root / index)
        if problem:
            return problem
    for shard in shards:
        problem = _safetensors(shard)
        if problem:
            return problem
    return None


def _index(path: Path) -> str | None:
    try:
        files = set(json.loads(path.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{path} is not a weight index (JSON with a 'weight_map'): {e}; {_AGAIN}"
    missing = sorted(f for f in files if not (path.parent / f).is_file())
    if missing:
        return f"{path} names weight files that are missing: {', '.join(missing)}; {_AGAIN}"
    return None


def _safetensors(path: Path) -> str | None:
    """A safetensors file is 8 bytes of header length, the JSON header, then the tensor data."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path} is truncated: {size} bytes, shorter than a safetensors header; {_AGAIN}"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"{path} is truncated or not a safetensors file: its header claims {n:,} bytes, the file has {size:,}; {_AGAIN}"
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            return f"{path} has a corrupt safetensors header ({e}); {_AGAIN}"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        state = "truncated" if expected > size else "longer than its header says"
        return f"{path} is {state}: its header describes {expected:,} bytes, the file has {size:,}; {_AGAIN}"
    return None


def _config(root: Path) -> str | None:
    try:
        json.loads((root / "config.json").read_text())
    except ValueError as e:
        return f"{root / 'config.json'} is not valid JSON ({e}); {_AGAIN}"
    return None
