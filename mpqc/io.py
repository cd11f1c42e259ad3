"""Files mpqc writes and reads: atomic writes, JSON-safe values, typed CSV tables.

The one copy every module uses. A write goes to a temporary file in the target's
directory, is flushed to disk, gets the mode a plain ``open()`` would give it (the
umask's), and is renamed over the target: a reader sees the old file or the whole new
one, never half of it.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

__all__ = [
    "atomic_file",
    "atomic_files",
    "check_output_dir",
    "check_output_file",
    "installed_file",
    "json_safe",
    "parse_cell",
    "read_csv",
    "typed_rows",
    "write_bytes_atomic",
    "write_csv_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


def _umask_mode() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file mode is 'w' or 'wb', got {mode!r}")
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_files(directory: str | os.PathLike, names: Sequence[str]) -> Iterator[str]:
    """A temporary directory inside ``directory`` for files that belong together.

    On a clean exit each of ``names`` that was written there is flushed and renamed into
    ``directory`` in the order given (name the file that refers to the others last).
    """
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    tmpdir = tempfile.mkdtemp(dir=directory, prefix=".tmp-")
    try:
        yield tmpdir
        for name in names:
            tmp = os.path.join(tmpdir, name)
            if os.path.exists(tmp):
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.chmod(tmp, _umask_mode())
                os.replace(tmp, os.path.join(directory, name))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))


def json_safe(value):
    """JSON has no NaN or Infinity: non-finite floats become null, tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# ---- checks of output paths, before the work that ends in writing them ---------------------------


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _check_creatable_in(directory: str, what: str, path) -> None:
    """``directory`` (the nearest existing ancestor of ``path``) must be a directory we can write in."""
    if not os.path.isdir(directory):
        raise ValueError(f"{what} {path}: {directory} is a file, not a directory; name a path under a directory")
    try:  # os.access says yes to root even on a read-only mount: try it for real
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".mpqc-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(
            f"{what} {path}: cannot write in {directory} ({e.strerror or e}); name a writable place"
        ) from None


def check_output_dir(path: str | os.PathLike, what: str = "output directory") -> None:
    """A ValueError now, not after the work, when ``path`` cannot become a directory of outputs:
    an existing file, or under a place that cannot be written. Creates nothing."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what} {path} is an existing file, not a directory; name a directory (made if missing)")
    _check_creatable_in(_nearest_existing(path), what, path)


def check_output_file(path: str | os.PathLike, what: str = "output file") -> None:
    """A ValueError now, not after the work, when ``path`` cannot be written as a file: an existing
    directory, or a place that cannot be written (files are replaced by a rename, so the directory
    decides). Creates nothing."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a directory; name a file (one inside it, or elsewhere)")
    _check_creatable_in(_nearest_existing(os.path.dirname(os.path.abspath(path))), what, path)


# ---- typed CSV tables ----------------------------------------------------------------------------


def write_csv_atomic(path: str | os.PathLike, rows: Sequence[Mapping], columns: Sequence[str]) -> None:
    """``rows`` as CSV with exactly ``columns`` (missing values and NaN as empty cells)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _cell_text(r.get(k, "")) for k in columns})
    write_text_atomic(path, buf.getvalue())


def _cell_text(value):
    return "" if isinstance(value, float) and math.isnan(value) else value


def read_csv(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows as dicts of strings) of a CSV file."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or ()), rows


def _parse_int(text: str) -> int:
    return int(text) if text.lstrip("-").isdigit() else int(float(text))


def _parse_block(text: str):
    return int(text) if text.isdigit() else text


# Cell kinds of a typed table: how a cell's text becomes a value ("" is NaN for numbers).
CELL_KINDS: dict[str, Callable[[str], object]] = {
    "str": str,
    "float": lambda v: math.nan if v == "" else float(v),
    "int": lambda v: math.nan if v == "" else _parse_int(v),
    "bool": lambda v: v == "True",
    "block": _parse_block,  # a block size: an int or a word ("vector", "tensor", "default")
    "floats": lambda v: tuple(float(x) for x in v.split()),  # space-separated; "" is none
}


def parse_cell(text: str, kind: str):
    return CELL_KINDS[kind](text)


def typed_rows(
    rows: Sequence[Mapping[str, str]], kinds: Mapping[str, str], *, default: str = "str", where: str = "table"
) -> list[dict]:
    """Rows of strings to typed values, column by column (``kinds``; others ``default``)."""
    out = []
    for line, raw in enumerate(rows, start=2):  # line 1 is the header
        row = {}
        for column, text in raw.items():
            if column is None:  # cells past the header's columns: kept as csv gives them
                row[column] = text
                continue
            kind = kinds.get(column, default)
            try:
                row[column] = parse_cell(text, kind)
            except ValueError:
                what = "a number" if kind in ("float", "int") else f"a valid {kind}"
                raise ValueError(f"{where} line {line}: column {column} is {text!r}, not {what}") from None
        out.append(row)
    return out


# ---- files that arrive inside installed wheels ---------------------------------------------------


def installed_file(package: str, relative: str, *, install: str, missing: str) -> Path:
    """The file ``relative`` inside the installed ``package``, without importing the package.

    ``install`` is the pip command that brings it; ``missing`` says what the file is for
    and what else the user could do (both go into the error when the package is absent).
    """
    # find_spec locates the package without executing its __init__, whose own
    # dependencies a --no-deps install leaves out; only the data file is needed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(missing.format(install=install))
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{package} is installed but {path} is missing; reinstall with `{install}`")
    return path
