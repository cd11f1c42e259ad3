import importlib.util

import pytest
import torch

from mpqc import data
from mpqc.data import load_text, load_tokens, split_tokens, strip_wiki_markup, tokenize

needs_gensim = pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None,
    reason="the Wikipedia sample ships in the gensim wheel: pip install --no-deps gensim==4.4.0",
)

SAMPLE = (
    "The quick brown fox jumps over the lazy dog. It was not amused.\n\n"
    "Second paragraph:  numbers 1234 and 56,  and\nline breaks.\n\n\n"
    "Third paragraph, with trailing text and unicode: café, naïve, 東京.\n\n"
) * 20


def byte_level_tokenizer(vocab_size=300, text=SAMPLE):
    """A GPT-2-style byte-level BPE tokenizer trained here in a blink (no download)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=vocab_size, min_frequency=1, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)


# ------------------------------------------------------------------------ text


def test_load_text_from_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first é\n", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not text", encoding="utf-8")
    assert load_text(tmp_path / "a.txt") == "first é\n"
    assert load_text(str(tmp_path)) == "first é\n\nsecond"  # sorted names, blank-line joined


def test_load_text_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="accepted: None or 'wiki'"):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        load_text(tmp_path)
    with pytest.raises(ValueError, match="hf:NAME"):
        load_text("hf:")


def test_hf_spec_fails_clearly_without_datasets_or_cache():
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ModuleNotFoundError, match="needs the `datasets` package"):
            load_text("hf:wikitext:wikitext-2-raw-v1")
    else:
        # Offline mode is forced, so this fails at once instead of after network retries.
        with pytest.raises(FileNotFoundError, match="nothing can be downloaded"):
            load_text("hf:mpqc-no-such-dataset-xyz")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="needs the optional `datasets` package")
def test_hf_spec_reads_a_local_dataset_directory(tmp_path):
    (tmp_path / "test.txt").write_text("line one\n\nline two\n", encoding="utf-8")
    (tmp_path / "train.txt").write_text("other split\n", encoding="utf-8")
    assert load_text(f"hf:{tmp_path}") == "line one\n\nline two"  # blank rows dropped
    assert load_text(f"hf:{tmp_path}::train") == "other split"


def test_strip_wiki_markup_on_hand_written_markup():
    wikitext = (
        "{{Infobox thing|name=X|note={{nested|deep}}}}\n"
        "'''Anarchism''' is a [[political philosophy]] that advocates "
        '[[self-governance|self-governed]] societies.<ref name="a/b"/>'
        "<ref>Citation [[Ignored]]</ref> See [http://example.com the site].<!-- hidden -->\n"
        "[[File:X.jpg|thumb|A caption with [[a link]] and [brackets].]]\n"
        '{| class="wikitable"\n| cell || {{tpl}}\n|}\n'
        "== History ==\n"
        "* Item one &amp; <small>two</small>\n"
        "[[Category:Political ideologies]]\n[[de:Anarchismus]]\n"
        "== References ==\n"
        "Gone.\n"
    )
    assert strip_wiki_markup(wikitext) == (
        "Anarchism is a political philosophy that advocates self-governed societies. "
        "See the site.\n\nHistory\nItem one & two"
    )


@needs_gensim
def test_wiki_sample_is_clean_deterministic_prose():
    text = load_text()
    assert text == load_text("wiki")
    assert text.startswith("Anarchism\n\nAnarchism is a political philosophy that advocates self-governed societies")
    # Measured: 2,775,797 characters and 436,769 words in 106 articles with the v1 stripper.
    assert 400_000 < len(text.split()) < 480_000
    for markup in ("{{", "}}", "[[", "]]", "<ref", "{|", "'''"):
        assert text.count(markup) <= 2, markup


# ---------------------------------------------------------------------- tokens


def test_chunked_tokenization_equals_whole_text_tokenization():
    tokenizer = byte_level_tokenizer()
    whole = tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
    for chunk_chars in (40, 100, 1000, 10**6):
        assert tokenize(tokenizer, SAMPLE, chunk_chars=chunk_chars, batch=3).tolist() == whole
    assert tokenizer.decode(whole) == SAMPLE


def test_load_tokens_caches_atomically_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("MPQC_CACHE", str(tmp_path / "cache"))
    text_file = tmp_path / "t.txt"
    text_file.write_text(SAMPLE, encoding="utf-8")
    tokenizer = byte_level_tokenizer()

    tokens = load_tokens(tokenizer, text_file)
    assert tokens.dtype == torch.long and tokens.dim() == 1
    assert tokens.tolist() == tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
    files = list((tmp_path / "cache" / "tokens").iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"  # no temp file left behind

    # The second call reads the cache: tokenizing again would fail.
    monkeypatch.setattr(data, "tokenize", lambda *a, **k: pytest.fail("cache was not reused"))
    assert torch.equal(load_tokens(tokenizer, text_file), tokens)
    assert torch.equal(load_tokens(tokenizer, text_file, max_tokens=10), tokens[:10])
    monkeypatch.undo()
    monkeypatch.setenv("MPQC_CACHE", str(tmp_path / "cache"))

    # Other text or another tokenizer is another cache entry.
    text_file.write_text(SAMPLE + "more", encoding="utf-8")
    load_tokens(tokenizer, text_file)
    load_tokens(byte_level_tokenizer(vocab_size=280), text_file)
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 3


def test_corrupt_cache_is_rebuilt_and_failed_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MPQC_CACHE", str(tmp_path))
    text_file = tmp_path / "t.txt"
    text_file.write_text(SAMPLE, encoding="utf-8")
    tokenizer = byte_level_tokenizer()
    tokens = load_tokens(tokenizer, text_file)
    (cached,) = (tmp_path / "tokens").iterdir()
    cached.write_bytes(b"truncated garbage")
    assert torch.equal(load_tokens(tokenizer, text_file), tokens)
    assert torch.equal(torch.load(cached, weights_only=True), tokens)

    cached.unlink()

    def broken_save(obj, f):
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        load_tokens(tokenizer, text_file)
    assert list((tmp_path / "tokens").iterdir()) == []


def test_load_tokens_rejects_bad_max_tokens(tmp_path):
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        load_tokens(None, tmp_path / "t.txt", max_tokens=0)


def test_text_prefix_is_what_the_tokenizer_puts_before_text():
    from tokenizers.processors import TemplateProcessing

    from mpqc.data import text_prefix

    tok = byte_level_tokenizer()
    assert text_prefix(tok) == ()  # GPT-2 style: no special tokens around text
    tok.add_special_tokens({"bos_token": "<bos>"})
    bos = tok.convert_tokens_to_ids("<bos>")
    tok._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    assert text_prefix(tok) == (bos,)  # Gemma / Llama 3 style: a BOS before every text


def test_split_tokens_is_contiguous_and_disjoint():
    tokens = torch.arange(1000)
    search, holdout = split_tokens(tokens)
    assert len(search) == 900 and len(holdout) == 100
    assert torch.equal(torch.cat([search, holdout]), tokens)
    search, holdout = split_tokens(tokens, 0.25)
    assert holdout[0].item() == 750
    with pytest.raises(ValueError, match=r"holdout_fraction must be in \(0, 1\)"):
        split_tokens(tokens, 1.0)
    with pytest.raises(ValueError, match="1-D"):
        split_tokens(tokens.reshape(10, 100))
