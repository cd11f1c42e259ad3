"""A training corpus from the real text that reaches this machine, with a held-out split.

:func:`build_corpus` reads each source as documents, cleans them to plain prose, removes
exact duplicate paragraphs (by hash, across every source), sends every ``holdout_every``-th
document of each source to the held-out split and the rest to train, and writes::

    <dir>/train/<source>.txt     one file per source, documents joined by blank lines
    <dir>/heldout/<source>.txt   the documents no model trains on
    <dir>/manifest.json          per source and split: documents, characters, sha256;
                                 written last (its presence means the corpus is whole)

``load_text("<dir>/heldout")`` (mpqc.data) reads a split like any folder of text, so a
sweep can evaluate on the held-out split. :func:`tokenize_corpus` tokenizes both splits
once per tokenizer, caches the streams and records their token counts in the manifest.

Sources (:data:`SOURCES`); one that is absent here is skipped with the reason printed and
kept in the manifest, never silently:

* ``wiki``: the Wikipedia sample inside the gensim wheel (mpqc.data), one document per article.
* ``lee``: gensim's ``lee_background.cor``, news, one document per line.
* ``austen``: Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (an R lazy-load
  database), one document per chapter; reading it needs the ``rdata`` package
  (``pip install mpqc[corpus]``).
* ``python-doc``: the Python 3.11 documentation from Debian's ``python3.11-doc`` (HTML), one
  document per page, code blocks and index pages left out.
* ``manpages``: the Linux man-pages project (Debian's ``manpages`` and ``manpages-dev``), one
  document per page, roff converted to prose by :func:`roff_to_text`; aliases (``.so``),
  tables and no-fill (code) blocks left out.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import html.parser
import json
import os
import re
import struct
import sys
import unicodedata
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from mpqc.io import installed_file, write_json_atomic, write_text_atomic

__all__ = [
    "DEFAULT_PATHS",
    "SOURCES",
    "Document",
    "SourceUnavailable",
    "build_corpus",
    "clean_text",
    "corpus_text",
    "deduplicate",
    "html_to_text",
    "load_manifest",
    "read_source",
    "roff_to_text",
    "split_documents",
    "tokenize_corpus",
]

SOURCES = ("wiki", "lee", "austen", "python-doc", "manpages")
SPLITS = ("train", "heldout")
# Where the Debian packages put their files; a build can point elsewhere (an unpacked .deb).
DEFAULT_PATHS = {
    "austen": "/usr/lib/R/site-library/janeaustenr/data",
    "python-doc": "/usr/share/doc/python3.11/html",
    "manpages": "/var/lib/dpkg/info",  # the packages' file lists name their pages
}
_MANPAGE_PACKAGES = ("manpages", "manpages-dev")
# Bump when cleaning, dedup or a reader changes: the corpus of the old code is then rebuilt.
CORPUS_VERSION = 1
MANIFEST = "manifest.json"


class SourceUnavailable(Exception):
    """A source that is not on this machine; the message says what would bring it."""


@dataclasses.dataclass(frozen=True)
class Document:
    source: str
    name: str  # unique within its source: an article title, a file, a chapter
    text: str


# ---------------------------------------------------------------------------- cleaning


def clean_text(text: str) -> str:
    """NFC, no control characters, single spaces, no line without a word character, and
    paragraphs (blocks between blank lines) separated by exactly one blank line."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(c for c in text if c == "\n" or unicodedata.category(c)[0] != "C" or c == "\t")
    lines = []
    for line in text.split("\n"):
        line = re.sub(r"[ \t\u00a0]+", " ", line).strip()
        lines.append(line if re.search(r"\w", line) else "")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p.strip()]


def _paragraph_hash(paragraph: str) -> bytes:
    return hashlib.sha256(" ".join(paragraph.split()).encode()).digest()


def deduplicate(
    documents: Iterable[Document], min_chars: int = 20, seen: set[bytes] | None = None
) -> tuple[list[Document], dict]:
    """Each paragraph of at least ``min_chars`` characters kept at its first occurrence only.

    Shorter ones (headings such as DESCRIPTION, one-word replies in a novel) are structure, not
    duplicated content, and stay. A document left empty is dropped. ``seen`` (hashes of
    paragraphs met before, updated here) carries the dedup across calls. Returns the documents
    and per source {"duplicate_paragraphs": n, "empty_documents": n}."""
    seen = set() if seen is None else seen
    kept, stats = [], {}
    for doc in documents:
        counts = stats.setdefault(doc.source, {"duplicate_paragraphs": 0, "empty_documents": 0})
        out = []
        for paragraph in paragraphs(doc.text):
            if len(paragraph) >= min_chars:
                digest = _paragraph_hash(paragraph)
                if digest in seen:
                    counts["duplicate_paragraphs"] += 1
                    continue
                seen.add(digest)
            out.append(paragraph)
        if out:
            kept.append(dataclasses.replace(doc, text="\n\n".join(out)))
        else:
            counts["empty_documents"] += 1
    return kept, stats


def split_documents(documents: Iterable[Document], holdout_every: int = 10) -> dict[str, list[Document]]:
    """Document i of each source (counted from 0, in reading order) is held out when
    i % holdout_every == holdout_every - 1, so every source gives 1 in holdout_every."""
    if not isinstance(holdout_every, int) or holdout_every < 2:
        raise ValueError(f"holdout_every must be an int >= 2, got {holdout_every!r}")
    out: dict[str, list[Document]] = {split: [] for split in SPLITS}
    index: dict[str, int] = {}
    for doc in documents:
        i = index.get(doc.source, 0)
        index[doc.source] = i + 1
        out["heldout" if i % holdout_every == holdout_every - 1 else "train"].append(doc)
    return out


# ------------------------------------------------------------------------------ readers


def _wiki(_path) -> Iterator[Document]:
    from mpqc.data import wiki_documents

    for title, text in wiki_documents():
        yield Document("wiki", title, text)


def _lee(_path) -> Iterator[Document]:
    from mpqc.data import GENSIM_PIP

    path = installed_file(
        "gensim",
        "test/test_data/lee_background.cor",
        install=GENSIM_PIP,
        missing="the source 'lee' is a file inside the gensim wheel; install it with `{install}`",
    )
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            yield Document("lee", f"{i:04d}", line)


def _r_lazyload(data_dir: Path) -> dict[str, list[str]]:
    """The character vectors of an R package's lazy-load data base (Rdata.rdx + Rdata.rdb)."""
    try:
        import rdata
    except ImportError:
        raise SourceUnavailable(
            f"{data_dir} is there, but reading R data needs the rdata package: pip install 'mpqc[corpus]' "
            "(or pip install rdata)"
        ) from None
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())))
    if int(index["compressed"][0]) != 1:
        raise ValueError(
            f"{data_dir}/Rdata.rdb is not zlib-compressed (R's compress={index['compressed']}); unsupported"
        )
    blob = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        record = blob[int(offset) : int(offset) + int(length)]
        raw = zlib.decompress(record[4:])  # 4 bytes: the uncompressed length, big-endian
        if len(raw) != struct.unpack(">I", record[:4])[0]:
            raise ValueError(f"{data_dir}/Rdata.rdb: object {name} decompresses to the wrong length")
        value = rdata.conversion.convert(rdata.parser.parse_data(raw))
        out[str(name)] = ["" if v is None else str(v) for v in value]
    return out


_CHAPTER = re.compile(r"^\s*(CHAPTER|Chapter)\s+([IVXLC]+|\d+)\b")


def _novel_chapters(title: str, lines: list[str]) -> Iterator[tuple[str, str]]:
    """(name, text) per chapter, hard-wrapped lines joined into paragraphs; the title page is one more."""
    chapters, current, name = [], [], f"{title}/000 front"
    for line in lines:
        if _CHAPTER.match(line):  # numbered: Emma restarts at CHAPTER I in each volume
            chapters.append((name, current))
            current, name = [], f"{title}/{len(chapters):03d} {' '.join(line.split())}"
        current.append(line)
    chapters.append((name, current))
    for name, block in chapters:
        text = "\n".join(block)
        yield name, "\n\n".join(" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip())


def _austen(path) -> Iterator[Document]:
    data_dir = Path(path)
    if not (data_dir / "Rdata.rdx").is_file():
        raise SourceUnavailable(f"{data_dir}/Rdata.rdx is missing: install Debian's r-cran-janeaustenr")
    for title, lines in _r_lazyload(data_dir).items():
        for name, text in _novel_chapters(title, lines):
            yield Document("austen", name, text)


class _HTMLText(html.parser.HTMLParser):
    """The text inside the element with role="main", paragraphs at block elements, without code
    blocks, scripts and Sphinx's pilcrow links."""

    _BLOCKS = {"p", "div", "section", "li", "dt", "dd", "tr", "table", "blockquote", "br", "ul", "ol", "dl", "hr"}
    _BLOCKS |= {f"h{i}" for i in range(1, 7)}
    _SKIP = {"pre", "script", "style"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.main_depth = 0  # open divs inside the main one (0: outside)
        self.skip: list[str] = []  # the open skipped elements

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.main_depth == 0:
            if tag == "div" and attrs.get("role") == "main":
                self.main_depth = 1
            return
        if tag == "div":
            self.main_depth += 1
        if tag in self._SKIP or (tag == "a" and "headerlink" in (attrs.get("class") or "")):
            self.skip.append(tag)
        elif tag in self._BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if self.main_depth == 0:
            return
        if self.skip and tag == self.skip[-1]:
            self.skip.pop()
        elif tag in self._BLOCKS and not self.skip:
            self.parts.append("\n\n")
        if tag == "div":
            self.main_depth -= 1

    def handle_data(self, data):
        if self.main_depth and not self.skip:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """The prose of one Sphinx HTML page (the part with role="main"), one paragraph per block."""
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    return "\n\n".join(" ".join(p.split()) for p in "".join(parser.parts).split("\n\n") if p.strip())


def _python_doc(path) -> Iterator[Document]:
    root = Path(path)
    if not root.is_dir():
        raise SourceUnavailable(f"{root} is missing: install Debian's python3.11-doc")
    skip = re.compile(r"(genindex.*|py-modindex|search|contents)\.html")
    for page in sorted(root.rglob("*.html")):
        rel = page.relative_to(root).as_posix()
        if rel.startswith("_") or skip.fullmatch(page.name):
            continue
        yield Document("python-doc", rel, html_to_text(page.read_text(encoding="utf-8", errors="replace")))


def _manpages(path) -> Iterator[Document]:
    info = Path(path)
    lists = [info / f"{package}.list" for package in _MANPAGE_PACKAGES]
    if not any(f.is_file() for f in lists):
        raise SourceUnavailable(f"no {' or '.join(str(f) for f in lists)}: install Debian's manpages, manpages-dev")
    pages = sorted(
        {
            Path(line)
            for f in lists
            if f.is_file()
            for line in f.read_text().splitlines()
            if re.fullmatch(r".*/man/man\d/[^/]+\.gz", line)  # English pages only: no /man/<lang>/
        }
    )
    for page in pages:
        if page.is_symlink() or not page.is_file():
            continue  # an alias of another page, or removed since
        raw = gzip.decompress(page.read_bytes())
        try:
            source = raw.decode("utf-8")
        except UnicodeDecodeError:
            source = raw.decode("latin-1")
        text = roff_to_text(source)
        if text is not None:
            yield Document("manpages", f"{page.parent.name}/{page.name[: -len('.gz')]}", text)


_READERS = {"wiki": _wiki, "lee": _lee, "austen": _austen, "python-doc": _python_doc, "manpages": _manpages}


def read_source(source: str, path: str | os.PathLike | None = None) -> list[Document]:
    """The cleaned documents of ``source`` (one of :data:`SOURCES`), read from ``path`` (default:
    :data:`DEFAULT_PATHS`). Raises SourceUnavailable when the source is not on this machine."""
    if source not in _READERS:
        raise ValueError(f"unknown corpus source {source!r}; known: {', '.join(SOURCES)}")
    try:
        docs = _READERS[source](path or DEFAULT_PATHS.get(source))
        cleaned = [dataclasses.replace(d, text=clean_text(d.text)) for d in docs]
    except (ModuleNotFoundError, FileNotFoundError) as e:  # the gensim wheel and its files
        raise SourceUnavailable(str(e)) from None
    return [d for d in cleaned if d.text]


# ------------------------------------------------------------------------------- roff

_GLYPHS = {
    "em": "\u2014", "en": "\u2013", "bu": "\u2022", "lq": "\u201c", "rq": "\u201d", "oq": "\u2018",
    "cq": "\u2019", "aq": "'", "dq": '"', "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122", "mu": "\u00d7",
    "+-": "\u00b1", ">=": "\u2265", "<=": "\u2264", "!=": "\u2260", "->": "\u2192", "<-": "\u2190",
    "ti": "~", "ha": "^", "ga": "`", "aa": "\u00b4", "dg": "\u2020", "de": "\u00b0", "hy": "-", "mi": "-",
    "pl": "+", "eq": "=", "sl": "/", "rs": "\\", "ul": "_", "ba": "|", "or": "|", "at": "@", "sh": "#",
    "Tm": "\u2122", "R": "\u00ae",
}  # fmt: skip
_ESCAPE = re.compile(
    r"\\(?:"
    r"f(?:\[[^\]]*\]|\(..|.)"  # font change
    r"|s[+-]?\d+|s\([+-]?\d\d|s\[[^\]]*\]"  # size change
    r"|\*(?:\((?P<s2>..)|\[(?P<sb>[^\]]*)\]|(?P<s1>.))"  # a defined string
    r"|\((?P<g2>..)|\[(?P<gb>[^\]]*)\]"  # a special character
    r"|n[+-]?(?:\(..|\[[^\]]*\]|.)"  # a number register
    r"|[hvwlLoXDSbZNRxk]'[^']*'|z."  # motions, drawing, widths: no text
    r"|(?P<one>.))",
    re.DOTALL,
)
_ONE = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": " ", "_": "_", ".": ".", "'": "'", "`": "`"}
_FONT_MACROS = {"B": " ", "I": " ", "SM": " ", "SB": " ", "BR": "", "RB": "", "IR": "", "RI": "", "BI": "", "IB": ""}
_BREAKS = {"PP", "LP", "P", "TP", "TQ", "IP", "HP", "sp", "br", "RS", "RE", "in", "ti", "ne", "bp", "SY", "YS"}
_BLOCK_ENDS = {"de": "..", "de1": "..", "am": "..", "ig": "..", "TS": ".TE", "EQ": ".EN"}


def _unescape(match: re.Match) -> str:
    name = match.group("s2") or match.group("sb") or match.group("s1")
    name = name or match.group("g2") or match.group("gb")
    if name is not None:
        return _GLYPHS.get(name, "")
    one = match.group("one")
    return _ONE.get(one, "") if one is not None else ""


def _roff_inline(text: str) -> str:
    return _ESCAPE.sub(_unescape, re.sub(r'(?<!\\)\\".*$', "", text))


def _macro_args(rest: str) -> list[str]:
    """A request's arguments: split at spaces, double quotes group ("" is a literal quote)."""
    return [a[1:-1].replace('""', '"') if a.startswith('"') else a for a in re.findall(r'"(?:[^"]|"")*"?|\S+', rest)]


def roff_to_text(source: str) -> str | None:
    """The prose of a man page written in roff (man macros); None for an alias (``.so``)."""
    source = re.sub(r"\\\n", "", source)  # continued lines
    out: list[str] = []  # paragraphs
    current: list[str] = []
    state = {"nofill": False, "until": None, "tag": False}

    def flush():
        if current:
            out.append(" ".join(current))
            current.clear()

    for line in source.split("\n"):
        if state["until"]:
            state["until"] = None if line.strip() == state["until"] else state["until"]
            continue
        if line.startswith((".", "'")):
            if _roff_request(line[1:].strip(), state, current, flush, out) == "alias":
                return None
            continue
        if not state["nofill"]:
            text = _roff_inline(line).strip()
            if text:
                current.append(text)
                if state["tag"]:
                    state["tag"] = False
                    flush()  # a .TP tag is its own line
    flush()
    return "\n\n".join(out)


def _roff_request(request: str, state: dict, current: list[str], flush, out: list[str]) -> str | None:
    """One control line: changes ``state`` and the paragraphs; "alias" for a .so page."""
    name, _, rest = request.partition(" ")
    if name.startswith('\\"') or not name:
        return None
    if name == "so":
        return "alias"
    if name in _BLOCK_ENDS:
        state["until"] = _BLOCK_ENDS[name]
    elif name in ("nf", "EX"):
        flush()
        state["nofill"] = True
    elif name in ("fi", "EE"):
        state["nofill"] = False
    elif name in ("SH", "SS"):
        flush()
        heading = _roff_inline(" ".join(_macro_args(rest))).strip()
        if heading:
            out.append(heading)
    elif name in _BREAKS:
        flush()
        state["tag"] = name in ("TP", "TQ")
    elif (name in _FONT_MACROS or name in ("UE", "ME")) and not state["nofill"]:
        text = _roff_inline(_FONT_MACROS.get(name, " ").join(_macro_args(rest))).strip()
        if text:
            current.append(text)
            if state["tag"]:
                state["tag"] = False
                flush()
    return None


# ---------------------------------------------------------------------------- building


def _config(sources, holdout_every: int, min_dedup_chars: int, paths: dict) -> dict:
    return {
        "version": CORPUS_VERSION,
        "sources": list(sources),
        "holdout_every": holdout_every,
        "min_dedup_chars": min_dedup_chars,
        "paths": {s: str(paths.get(s) or DEFAULT_PATHS.get(s) or "") for s in sources},
    }


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def load_manifest(directory: str | os.PathLike) -> dict | None:
    """The manifest of a whole corpus in ``directory``, or None when there is none."""
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _read_all(sources, paths: dict) -> tuple[list[Document], dict]:
    docs, skipped = [], {}
    for source in sources:
        try:
            docs.extend(read_source(source, paths.get(source)))
        except SourceUnavailable as e:
            skipped[source] = str(e)
            print(f"corpus: source {source!r} skipped: {e}", file=sys.stderr)
    return docs, skipped


def _source_entry(source: str, split_docs: dict[str, list[Document]], stats: dict, texts: dict) -> dict:
    entry = {"status": "used", "documents": {}, "characters": {}, "sha256": {}}
    for split in SPLITS:
        entry["documents"][split] = sum(d.source == source for d in split_docs[split])
        entry["characters"][split] = len(texts[split][source])
        entry["sha256"][split] = _sha256(texts[split][source])
    entry["duplicate_paragraphs_removed"] = stats.get(source, {}).get("duplicate_paragraphs", 0)
    entry["documents_emptied_by_dedup"] = stats.get(source, {}).get("empty_documents", 0)
    return entry


def build_corpus(
    directory: str | os.PathLike,
    sources: Iterable[str] = SOURCES,
    *,
    holdout_every: int = 10,
    min_dedup_chars: int = 20,
    paths: dict | None = None,
    rebuild: bool = False,
) -> dict:
    """Build the corpus in ``directory`` (see the module docstring) and return its manifest.

    A corpus already there with the same settings is returned as it is, unless ``rebuild``.
    ``paths`` maps a source to where to read it instead of :data:`DEFAULT_PATHS`."""
    sources, paths = tuple(sources), dict(paths or {})
    unknown = sorted(set(sources) - set(SOURCES)) + sorted(set(paths) - set(SOURCES))
    if unknown:
        raise ValueError(f"unknown corpus source(s) {unknown}; known: {', '.join(SOURCES)}")
    directory = Path(directory)
    config = _config(sources, holdout_every, min_dedup_chars, paths)
    manifest = load_manifest(directory)
    if manifest is not None and manifest["config"] == config and not rebuild:
        return manifest
    (directory / MANIFEST).unlink(missing_ok=True)  # a crash from here on leaves no corpus, not a mixed one
    docs, skipped = _read_all(sources, paths)
    if not docs:
        raise ValueError(f"no corpus source could be read: {skipped}")
    split_docs = split_documents(docs, holdout_every)  # by reading order, before dedup removes any
    # Train first: a paragraph in both splits stays in train and leaves the held-out document.
    seen: set[bytes] = set()
    stats: dict[str, dict] = {}
    for split in SPLITS:
        split_docs[split], split_stats = deduplicate(split_docs[split], min_dedup_chars, seen)
        for source, counts in split_stats.items():
            total = stats.setdefault(source, dict.fromkeys(counts, 0))
            for key, n in counts.items():
                total[key] += n
    used = [s for s in sources if s not in skipped]
    texts = {
        split: {s: "\n\n".join(d.text for d in split_docs[split] if d.source == s) for s in used} for split in SPLITS
    }
    manifest = {"config": config, "sources": {}, "splits": {}, "tokens": {}}
    for source in sources:
        manifest["sources"][source] = (
            {"status": "skipped", "reason": skipped[source]}
            if source in skipped
            else _source_entry(source, split_docs, stats, texts)
        )
    _write_splits(directory, texts, manifest)
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


def _write_splits(directory: Path, texts: dict, manifest: dict) -> None:
    """The split files, each atomically; files of an earlier build that this one lacks are removed."""
    for split in SPLITS:
        folder = directory / split
        files = {f"{source}.txt": text for source, text in texts[split].items()}
        for name, text in files.items():
            write_text_atomic(folder / name, text)
        for stale in folder.glob("*.txt"):
            if stale.name not in files:
                stale.unlink()
        whole = "\n\n".join(texts[split].values())
        manifest["splits"][split] = {
            "files": sorted(files),
            "documents": sum(e.get("documents", {}).get(split, 0) for e in manifest["sources"].values()),
            "characters": len(whole),
            "sha256": _sha256(whole),
        }


def corpus_text(directory: str | os.PathLike, split: str, source: str | None = None) -> str:
    """The text of one split (every used source, in manifest order, joined by blank lines) or of one
    source in it; checked against the manifest's sha256."""
    manifest = _require_manifest(directory)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    sources = [s for s, e in manifest["sources"].items() if e["status"] == "used"]
    if source is not None:
        if source not in sources:
            raise ValueError(f"source {source!r} is not in the corpus at {directory}; it has {sources}")
        sources = [source]
    texts = [(Path(directory) / split / f"{s}.txt").read_text(encoding="utf-8") for s in sources]
    whole = "\n\n".join(texts)
    expected = manifest["sources"][source]["sha256"][split] if source else manifest["splits"][split]["sha256"]
    if _sha256(whole) != expected:
        raise ValueError(f"{directory}/{split}: the text does not match the manifest's sha256; rebuild the corpus")
    return whole


def _require_manifest(directory) -> dict:
    manifest = load_manifest(directory)
    if manifest is None:
        raise FileNotFoundError(f"{directory} holds no whole corpus (no {MANIFEST}); build it with build_corpus")
    return manifest


def tokenize_corpus(directory: str | os.PathLike, tokenizer) -> dict:
    """{"train": stream, "heldout": stream}: each split's sources tokenized one by one and
    concatenated in manifest order, cached under ``<dir>/tokens/<tokenizer>/``; the token
    counts per source and split go into the manifest."""
    import torch

    from mpqc.data import save_tensor_atomic, tokenize, tokenizer_fingerprint

    manifest = _require_manifest(directory)
    fingerprint = tokenizer_fingerprint(tokenizer)
    folder = Path(directory) / "tokens" / fingerprint
    streams, counts = {}, dict(manifest["tokens"].get(fingerprint, {}))
    for split in SPLITS:
        path = folder / f"{split}-{manifest['splits'][split]['sha256'][:16]}.pt"
        per_source = {}
        if path.is_file() and split in counts:
            streams[split] = torch.load(path, weights_only=True)
            continue
        pieces = []
        for source, entry in manifest["sources"].items():
            if entry["status"] == "used":
                pieces.append(tokenize(tokenizer, corpus_text(directory, split, source)))
                per_source[source] = pieces[-1].numel()
        streams[split] = torch.cat(pieces)
        save_tensor_atomic(streams[split], path)
        counts[split] = {**per_source, "total": streams[split].numel()}
    if counts != manifest["tokens"].get(fingerprint):
        manifest["tokens"][fingerprint] = counts
        write_json_atomic(Path(directory) / MANIFEST, manifest)
    return streams
