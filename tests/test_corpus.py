"""mpqc.corpus: cleaning, the roff and HTML readers, dedup by hash, the deterministic split, and a
whole corpus built twice (the same bytes; no held-out paragraph in train)."""

import gzip
import importlib.util
import json
import random

import pytest

from mpqc import corpus
from mpqc.corpus import Document, build_corpus, corpus_text, deduplicate, split_documents

WORDS = "the river city year people north government war first church house king music language".split()


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_doc_pages(root, n_pages=23, seed=0):
    """Sphinx-like HTML pages: navigation outside the main part, a code block and a pilcrow link
    inside it, and one paragraph shared by every page (a duplicate the build must remove)."""
    rng = random.Random(seed)
    (root / "_static").mkdir(parents=True)
    (root / "_static" / "skip.html").write_text('<div role="main"><p>static, never read</p></div>')
    (root / "genindex.html").write_text('<div role="main"><p>an index page, never read</p></div>')
    for i in range(n_pages):
        body = "".join(f"<p>{sentence(rng)} {sentence(rng)}</p>" for _ in range(3))
        (root / f"page{i:02d}.html").write_text(
            '<html><body><div class="related">Navigation text</div>'
            f'<div class="body" role="main"><h1>Page {i}<a class="headerlink" href="#">\u00b6</a></h1>'
            f"{body}<p>Every page says this same sentence about the license.</p>"
            '<div class="highlight"><pre>print("code")\n</pre></div></div>'
            '<div class="footer">Footer text</div></body></html>'
        )


def test_clean_text_normalizes_spaces_lines_and_paragraphs():
    text = "  Caf\u0065\u0301  au\tlait \r\n---\n\n\n\nSecond\u00a0 para\x07graph  \n"
    assert corpus.clean_text(text) == "Caf\u00e9 au lait\n\nSecond paragraph"


def test_roff_to_text_keeps_prose_and_drops_markup():
    page = (
        '.\\" a comment\n.TH TEST 1 2023-01-01 "Linux man-pages"\n.SH NAME\ntest \\- do a thing\n'
        ".SH SYNOPSIS\n.nf\n.B test [\\-a]\n.fi\n.SH DESCRIPTION\n.B test\nreads\n.IR file ,\nthen\n"
        ".BR write (2)s\nit\\(emquickly. \\fBBold\\fP and \\fIitalic\\fR.\n.PP\nSecond paragraph.\n"
        '.TP\n.B \\-a\nAll of them.\n.TS\ntab(;);\nl l.\na;b\n.TE\n.de XX\nignored\n..\nLast "line".\n'
    )
    assert corpus.roff_to_text(page) == (
        "NAME\n\ntest - do a thing\n\nSYNOPSIS\n\nDESCRIPTION\n\n"
        "test reads file, then write(2)s it\u2014quickly. Bold and italic.\n\n"
        'Second paragraph.\n\n-a\n\nAll of them. Last "line".'
    )
    assert corpus.roff_to_text(".so man2/open.2\n") is None  # an alias of another page


def test_html_to_text_reads_only_the_main_part_without_code():
    markup = (
        '<div class="related">nav</div><div class="body" role="main"><h1>Title<a class="headerlink">\u00b6</a>'
        "</h1><p>One <code>x</code> &amp; two.</p><div><pre>code()</pre></div><ul><li>item</li></ul></div><p>out</p>"
    )
    assert corpus.html_to_text(markup) == "Title\n\nOne x & two.\n\nitem"


def test_dedup_removes_exact_duplicate_paragraphs_by_hash():
    long = "A paragraph long enough to be deduplicated."
    docs = [
        Document("s", "a", f"{long}\n\nShort\n\nOnly in a, and long enough too."),
        Document("s", "b", f"{long.replace(' ', '  ')}\n\nShort"),  # the same text up to spaces
        Document("s", "c", long),  # nothing left: dropped
    ]
    kept, stats = deduplicate(docs, min_chars=20)
    assert [(d.name, d.text) for d in kept] == [
        ("a", f"{long}\n\nShort\n\nOnly in a, and long enough too."),
        ("b", "Short"),  # short paragraphs are structure, kept
    ]
    assert stats == {"s": {"duplicate_paragraphs": 2, "empty_documents": 1}}


def test_split_holds_out_every_tenth_document_of_each_source():
    docs = [Document(src, str(i), "x") for src, n in (("a", 25), ("b", 9)) for i in range(n)]
    split = split_documents(docs, holdout_every=10)
    assert [(d.source, d.name) for d in split["heldout"]] == [("a", "9"), ("a", "19")]
    assert len(split["train"]) == 32
    with pytest.raises(ValueError, match="holdout_every"):
        split_documents(docs, holdout_every=1)


def test_build_is_deterministic_and_no_heldout_text_is_in_train(tmp_path, capsys):
    write_doc_pages(tmp_path / "html")
    paths = {"python-doc": tmp_path / "html", "austen": tmp_path / "no-austen"}
    sources = ("austen", "python-doc")
    one = build_corpus(tmp_path / "one", sources, paths=paths)
    two = build_corpus(tmp_path / "two", sources, paths=paths)
    assert "source 'austen' skipped" in capsys.readouterr().err  # said, not silent
    assert one == two
    for split in ("train", "heldout"):
        assert (tmp_path / "one" / split / "python-doc.txt").read_bytes() == (
            tmp_path / "two" / split / "python-doc.txt"
        ).read_bytes()
    assert (
        one["sources"]["austen"]["status"] == "skipped" and "r-cran-janeaustenr" in one["sources"]["austen"]["reason"]
    )
    entry = one["sources"]["python-doc"]
    # 23 pages (not _static, not genindex): pages 9 and 19 held out; the shared sentence is
    # kept once, in the first train page, and removed from the other 22.
    assert entry["documents"] == {"train": 21, "heldout": 2} and entry["duplicate_paragraphs_removed"] == 22
    train, heldout = corpus_text(tmp_path / "one", "train"), corpus_text(tmp_path / "one", "heldout")
    assert heldout.startswith("Page 9\n\n") and "\n\nPage 19\n\n" in heldout
    assert "Navigation" not in train + heldout and "print(" not in train + heldout and "never read" not in train
    assert train.count("Every page says this same sentence") == 1
    train_paragraphs = set(corpus.paragraphs(train))
    assert not [p for p in corpus.paragraphs(heldout) if len(p) >= 20 and p in train_paragraphs]
    assert entry["characters"] == {"train": len(train), "heldout": len(heldout)}


def test_a_finished_build_is_reused_and_a_changed_one_rebuilt(tmp_path):
    write_doc_pages(tmp_path / "html")
    paths = {"python-doc": tmp_path / "html"}
    build_corpus(tmp_path / "c", ("python-doc",), paths=paths)
    manifest = tmp_path / "c" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    build_corpus(tmp_path / "c", ("python-doc",), paths=paths)
    assert manifest.stat().st_mtime_ns == stamp  # the same settings: nothing rewritten
    rebuilt = build_corpus(tmp_path / "c", ("python-doc",), paths=paths, holdout_every=5)
    assert rebuilt["sources"]["python-doc"]["documents"]["heldout"] == 4
    assert json.loads(manifest.read_text()) == rebuilt
    with pytest.raises(ValueError, match="unknown corpus source"):
        build_corpus(tmp_path / "d", ("novels",))


def test_manpages_come_from_the_package_file_lists(tmp_path):
    man = tmp_path / "usr" / "man" / "man2"
    man.mkdir(parents=True)
    (man / "open.2.gz").write_bytes(gzip.compress(b".TH OPEN 2\n.SH NAME\nopen \\- open a file\n"))
    (man / "creat.2.gz").write_bytes(gzip.compress(b".so man2/open.2\n"))
    (man / "alias.2.gz").symlink_to(man / "open.2.gz")
    info = tmp_path / "info"
    info.mkdir()
    (info / "manpages-dev.list").write_text("\n".join(str(p) for p in sorted(man.iterdir())) + "\n/usr/share/doc\n")
    docs = corpus.read_source("manpages", info)
    assert [(d.name, d.text) for d in docs] == [("man2/open.2", "NAME\n\nopen - open a file")]
    with pytest.raises(corpus.SourceUnavailable, match="manpages-dev"):
        corpus.read_source("manpages", tmp_path / "nothing")


@pytest.mark.skipif(importlib.util.find_spec("rdata") is not None, reason="rdata is installed")
def test_austen_without_rdata_names_the_extra(tmp_path):
    (tmp_path / "Rdata.rdx").write_bytes(b"")
    with pytest.raises(corpus.SourceUnavailable, match=r"mpqc\[corpus\]"):
        corpus.read_source("austen", tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="lee_background.cor ships in the gensim wheel")
def test_real_news_corpus_split_is_disjoint(tmp_path):
    manifest = build_corpus(tmp_path, ("lee",))
    entry = manifest["sources"]["lee"]
    # 300 articles, 30 held out; 7 repeat an earlier train article word for word and go (6 in
    # train, 1 held out).
    assert entry["documents"] == {"train": 264, "heldout": 29} and entry["documents_emptied_by_dedup"] == 7
    train = set(corpus.paragraphs(corpus_text(tmp_path, "train")))
    assert not train & set(corpus.paragraphs(corpus_text(tmp_path, "heldout")))
