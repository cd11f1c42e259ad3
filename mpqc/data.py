"""Real text for evaluation: load it, tokenize it once, cache the token stream.

Text specs accepted by :func:`load_text` and :func:`load_tokens`:

* ``None`` or ``"wiki"``: the embedded default, a real English Wikipedia sample
  (106 articles, about 480k words) shipped inside the ``gensim`` wheel as a bz2
  XML dump. Only the file is read; gensim itself is never imported (it needs
  ``smart_open``, which ``pip install --no-deps gensim==4.4.0`` does not bring).
  Wiki markup is stripped by :func:`strip_wiki_markup`, a small regex pass of
  our own, giving WikiText-like prose; articles are joined with blank lines in
  dump order, so the text is deterministic.
* a path to a ``.txt`` file, or a directory of ``.txt`` files (joined with blank
  lines in sorted name order).
* ``"hf:NAME[:CONFIG][:SPLIT]"``: a Hugging Face dataset already in the local
  ``datasets`` cache (nothing can be downloaded here); its ``text`` column is
  joined with blank lines. SPLIT defaults to ``test``.

A training corpus from several sources, with a held-out split by document, is mpqc.corpus.

Holdout convention: :func:`split_tokens` cuts a stream into a leading search part
and a trailing holdout part (by default the last 10%), so a search and the final
report it is judged by never share text.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import html
import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from mpqc.io import atomic_file, installed_file

__all__ = [
    "DEFAULT_TEXT",
    "GENSIM_PIP",
    "cache_dir",
    "load_text",
    "load_tokens",
    "save_tensor_atomic",
    "split_tokens",
    "strip_wiki_markup",
    "tokenize",
    "tokenizer_fingerprint",
    "wiki_documents",
    "wiki_sample_path",
]

DEFAULT_TEXT = "wiki"
_WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
GENSIM_PIP = "pip install --no-deps gensim==4.4.0"
# Bump when strip_wiki_markup changes, so cached token streams of the old text die.
_STRIPPER_VERSION = 1


# --------------------------------------------------------------------------- text


def wiki_sample_path() -> Path:
    """Path of the Wikipedia sample inside the installed gensim wheel."""
    return installed_file(
        "gensim",
        _WIKI_FILE,
        install=GENSIM_PIP,
        missing="the default text 'wiki' is the Wikipedia sample inside the gensim wheel, and gensim is not "
        "installed; install it with `{install}`, or pass a path to a .txt file or directory instead",
    )


# Sections after which an article is only lists of links and citations.
_TAIL_SECTIONS = re.compile(
    r"^==+\s*(See also|References|Notes|Footnotes|Citations|Sources|Bibliography|"
    r"Further reading|External links)\s*==+\s*$",
    re.IGNORECASE | re.MULTILINE,
)
_DROP_LINK_NAMESPACES = {"file", "image", "media", "category"}
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(-[a-z]+)*:")


def _replace_innermost(pattern: re.Pattern, repl, text: str) -> str:
    # Templates, tables and links nest; removing the innermost layer until
    # nothing changes handles any depth with a non-recursive regex.
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _link(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    namespace = target.split(":", 1)[0].strip().lower() if ":" in target else ""
    if namespace in _DROP_LINK_NAMESPACES:
        return ""
    if not label and _INTERLANGUAGE.match(target.strip()):
        return ""  # [[de:Anarchismus]]
    # [[target|label]] shows label (its last field); [[target]] shows target.
    return (label.rsplit("|", 1)[-1] if label else target).strip()


def strip_wiki_markup(wikitext: str) -> str:
    """Plain prose from MediaWiki markup: drops templates, tables, references,
    files, categories and tags; keeps link labels, headings (as their own lines)
    and paragraph breaks. Deterministic; good enough for perplexity text, not a
    full MediaWiki parser."""
    text = html.unescape(wikitext)
    cut = _TAIL_SECTIONS.search(text)
    if cut:
        text = text[: cut.start()]
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    text = re.sub(r"<ref\b[^>]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL)
    text = re.sub(
        r"<(math|gallery|timeline|score|syntaxhighlight|source|pre|imagemap)\b.*?</\1>",
        "",
        text,
        flags=re.DOTALL | re.IGNORECASE,
    )
    text = _replace_innermost(re.compile(r"\{\{[^{}]*\}\}"), "", text)
    text = _replace_innermost(re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL), "", text)
    # A link holds no [[ or ]] of its own but may hold single brackets (captions).
    text = _replace_innermost(re.compile(r"\[\[((?:(?!\[\[|\]\]).)*?)\]\]", re.DOTALL), _link, text)
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)  # [url label]
    text = re.sub(r"<[^>]+>", "", text)  # remaining tags, keep their content
    text = re.sub(r"'{2,}", "", text)  # bold / italic
    text = re.sub(r"__[A-Z]+__", "", text)  # __NOTOC__ and friends
    lines = []
    for line in text.splitlines():
        line = line.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            line = heading.group(2)
        line = re.sub(r"^[*#:;]+\s*", "", line)  # list and indent markers
        line = re.sub(r"[ \t]{2,}", " ", line)
        # Leftovers of removed markup (lone brackets, pipes, punctuation) are not text.
        if not re.search(r"\w", line):
            line = ""
        lines.append(line)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _wiki_articles(path: Path):
    """(title, wikitext) of every main-namespace article that is not a redirect."""
    with bz2.open(path) as f:
        root = ET.parse(f).getroot()
    ns = {"m": root.tag[1:].split("}")[0]} if root.tag.startswith("{") else {"m": ""}
    for page in root.iterfind("m:page", ns):
        if page.findtext("m:ns", "", ns) != "0" or page.find("m:redirect", ns) is not None:
            continue
        yield page.findtext("m:title", "", ns), page.findtext("m:revision/m:text", "", ns)


def wiki_documents():
    """(title, plain text) of every article of the Wikipedia sample with text left after
    :func:`strip_wiki_markup`, in dump order; the text starts with the title."""
    for title, wikitext in _wiki_articles(wiki_sample_path()):
        body = strip_wiki_markup(wikitext)
        if body:
            yield title, f"{title}\n\n{body}"


def _load_wiki() -> str:
    return "\n\n".join(text for _, text in wiki_documents())


@contextlib.contextmanager
def _hf_offline():
    """Make datasets and huggingface_hub read only their caches, never the network
    (which here would mean a minute of retries before failing)."""
    # The libraries read these flags when first imported: set the environment for
    # a first import, and patch the already-read module constants for a later one.
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update({k: "1" for k in env})
    patched = []
    for module_name, attrs in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
    ):
        module = sys.modules.get(module_name)
        for attr in attrs:
            if module is not None and hasattr(module, attr):
                patched.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _load_hf(spec: str) -> str:
    parts = spec[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"bad dataset spec {spec!r}; expected 'hf:NAME[:CONFIG][:SPLIT]'")
    name, config, split = (parts + [None, None])[:3]
    split = split or "test"
    try:
        with _hf_offline():
            import datasets
    except ImportError:
        raise ModuleNotFoundError(
            f"text spec {spec!r} needs the `datasets` package (pip install datasets) "
            "and the dataset already in its local cache; nothing can be downloaded here. "
            "Use 'wiki' or a path to a .txt file instead"
        ) from None
    try:
        with _hf_offline():
            ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:
        raise FileNotFoundError(
            f"dataset {name!r} (config {config!r}, split {split!r}) is not in the local "
            f"datasets cache and nothing can be downloaded here ({type(e).__name__}: {e}). "
            "Use 'wiki' or a path to a .txt file instead"
        ) from e
    if "text" not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no 'text' column; its columns are {ds.column_names}")
    return "\n\n".join(t for t in ds["text"] if t and t.strip())


def load_text(spec: str | os.PathLike | None = None) -> str:
    """The text named by ``spec`` (see the module docstring for accepted specs)."""
    if spec is None or spec == DEFAULT_TEXT:
        return _load_wiki()
    if isinstance(spec, str) and spec.startswith("hf:"):
        return _load_hf(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"directory {path} contains no .txt files")
        return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)
    raise FileNotFoundError(
        f"text spec {str(spec)!r} is neither an existing file or directory nor a known "
        "name; accepted: None or 'wiki' (the Wikipedia sample in the gensim wheel), a .txt "
        "file, a directory of .txt files, or 'hf:NAME[:CONFIG][:SPLIT]' (datasets cache only)"
    )


# ------------------------------------------------------------------------ tokens


def cache_dir() -> Path:
    """Where token streams are cached: $MPQC_CACHE, else ~/.cache/mpqc."""
    return Path(os.environ.get("MPQC_CACHE") or Path.home() / ".cache" / "mpqc")


def tokenizer_fingerprint(tokenizer) -> str:
    # The serialized fast tokenizer covers vocab, merges, normalizer and
    # pre-tokenizer: anything that changes token ids changes the hash.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:
        blob = repr(sorted(tokenizer.get_vocab().items()))
    name = Path(str(getattr(tokenizer, "name_or_path", "") or "tokenizer")).name
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)[:40]}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _chunks(text: str, max_chars: int):
    # Cut just before the last whitespace character of a paragraph break (else
    # a line break, else a space): "...end.\n" | "\nNext". Under byte-level BPE
    # with the GPT-2 split rule (SmolLM2, GPT-2) that is a pre-token boundary
    # when the next character is not whitespace, so chunked ids equal
    # whole-text ids; for other tokenizers only the split of the whitespace at
    # a cut may differ, at a few dozen places in a long text.
    start = 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):
            for sep in ("\n\n", "\n", " "):
                cut = text.rfind(sep, start + 1, end)
                if cut > start:
                    end = cut + len(sep) - 1
                    break
        yield text[start:end]
        start = end


def tokenize(tokenizer, text: str, *, chunk_chars: int = 65536, batch: int = 16) -> torch.Tensor:
    """Token ids of ``text`` as one 1-D int64 stream, without special tokens."""
    ids: list[int] = []
    chunks = list(_chunks(text, chunk_chars))
    for i in range(0, len(chunks), batch):
        # Chunks are far longer than model_max_length on purpose (few boundaries);
        # the stream is windowed later, so verbose=False silences that warning.
        enc = tokenizer(chunks[i : i + batch], add_special_tokens=False, verbose=False)
        for row in enc["input_ids"]:
            ids.extend(row)
    return torch.tensor(ids, dtype=torch.long)


def save_tensor_atomic(tensor: torch.Tensor, path: Path) -> None:
    with atomic_file(path, "wb") as f:  # readers see the old file or the whole new one
        torch.save(tensor, f)


def load_tokens(
    tokenizer,
    spec: str | os.PathLike | None = None,
    *,
    max_tokens: int | None = None,
    cache: bool = True,
) -> torch.Tensor:
    """The text named by ``spec`` as a 1-D int64 token stream (no special tokens).

    The full stream is cached on disk under :func:`cache_dir`, keyed by the hash
    of the text and of the tokenizer, so a second call only reads a file.
    ``max_tokens`` keeps the first that many tokens.
    """
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens <= 0):
        raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
    text = load_text(spec)
    if not text:
        raise ValueError(f"text {str(spec)!r} is empty")
    text_hash = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = cache_dir() / "tokens" / f"{text_hash}-{tokenizer_fingerprint(tokenizer)}.pt"
    tokens = None
    if cache and path.is_file():
        try:
            tokens = torch.load(path, weights_only=True)
        except Exception:
            tokens = None  # unreadable cache: rebuild it below
    if tokens is None:
        tokens = tokenize(tokenizer, text)
        if cache:
            save_tensor_atomic(tokens, path)
    return tokens[:max_tokens] if max_tokens is not None else tokens


def text_prefix(tokenizer) -> tuple[int, ...]:
    """The token ids ``tokenizer`` puts before any text (its BOS token, if it adds one).

    A token stream is tokenized without special tokens, so windows cut from it need these in
    front to look like what the model saw in training: Gemma's perplexity on windows without
    its ``<bos>`` is several times higher (measured: 233 against 33 on 8 windows of 128)."""
    with_special = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    n = len(with_special) - len(plain)
    if n <= 0 or with_special[n:] != plain:
        return ()
    return tuple(int(t) for t in with_special[:n])


def split_tokens(tokens: torch.Tensor, holdout_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(search, holdout): the leading ``1 - holdout_fraction`` of the stream and
    the trailing rest. Contiguous, so no window of one overlaps the other; use
    the search part while choosing plans and the holdout part for final numbers."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        raise ValueError("tokens must be a 1-D tensor (a token stream)")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction!r}")
    cut = len(tokens) - int(round(len(tokens) * holdout_fraction))
    return tokens[:cut], tokens[cut:]
