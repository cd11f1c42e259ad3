import math

import pytest
import torch
import torch.nn.functional as F

from mpqc.evaluate import nll, perplexity, sample_windows, window_nlls


class Uniform(torch.nn.Module):
    """Returns all-zero logits over V classes: every token has probability 1/V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        return torch.zeros(*input_ids.shape, self.vocab)


class NextTokenHalf(torch.nn.Module):
    """On the stream 0, 1, ..., V-1, 0, 1, ... gives the true next token
    probability exactly 1/2 and the other V-1 tokens 1/(2(V-1)) each."""

    def __init__(self, vocab):
        super().__init__()
        table = torch.full((vocab, vocab), math.log(0.5 / (vocab - 1)))
        table[torch.arange(vocab), (torch.arange(vocab) + 1) % vocab] = math.log(0.5)
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids):
        return self.table[input_ids]


def tiny_llama(vocab=64, seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


# --------------------------------------------------------------------- windows


def test_windows_are_deterministic_per_seed_and_differ_across_seeds():
    tokens = torch.arange(10_000)
    a = sample_windows(tokens, seq_len=100, n_samples=20, seed=0)
    b = sample_windows(tokens, seq_len=100, n_samples=20, seed=0)
    c = sample_windows(tokens, seq_len=100, n_samples=20, seed=1)
    assert a.shape == (20, 100) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_windows_are_contiguous_non_overlapping_and_nested():
    tokens = torch.arange(10_000)
    w = sample_windows(tokens, seq_len=100, n_samples=50, seed=3)
    # Each window is a run of consecutive stream positions starting on a slot boundary.
    assert torch.equal(w - w[:, :1], torch.arange(100).expand(50, 100))
    assert (w[:, 0] % 100 == 0).all()
    assert len(set(w[:, 0].tolist())) == 50
    # Fewer samples with the same seed are a prefix: a small run reuses a big one's windows.
    assert torch.equal(sample_windows(tokens, 100, 10, seed=3), w[:10])


def test_windows_with_a_prefix_start_with_it_and_keep_their_length():
    tokens = torch.arange(10_000) + 5
    w = sample_windows(tokens, seq_len=100, n_samples=30, seed=3, prefix=(1,))
    assert w.shape == (30, 100)
    assert (w[:, 0] == 1).all()
    body = w[:, 1:]
    assert torch.equal(body - body[:, :1], torch.arange(99).expand(30, 99))  # 99 consecutive stream tokens
    assert ((body[:, 0] - 5) % 99 == 0).all() and len(set(body[:, 0].tolist())) == 30
    assert sample_windows(torch.arange(990), 100, 10, prefix=(7,)).shape == (10, 100)  # 10 x 99 tokens fit
    with pytest.raises(ValueError, match="prefix"):
        sample_windows(tokens, seq_len=3, n_samples=1, prefix=(1, 2))


def test_perplexity_counts_the_prediction_after_the_prefix():
    model = tiny_llama()
    tokens = torch.randint(3, 64, (4000,), generator=torch.Generator().manual_seed(0))
    windows = sample_windows(tokens, 32, 4, seed=0, prefix=(1,))
    got = nll(model, tokens, seq_len=32, n_samples=4, seed=0, prefix=(1,), progress=False)
    assert got == nll(model, windows=windows, progress=False)
    with torch.no_grad():
        logits = model(windows).logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert math.isclose(got, want.item(), rel_tol=1e-5)


def test_all_windows_fit_exactly_and_one_more_is_a_clear_error():
    tokens = torch.arange(1000)
    w = sample_windows(tokens, seq_len=100, n_samples=10, seed=0)
    assert sorted(w[:, 0].tolist()) == list(range(0, 1000, 100))
    with pytest.raises(ValueError, match="at most 10 non-overlapping windows fit"):
        sample_windows(tokens, seq_len=100, n_samples=11, seed=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(tokens=torch.arange(100).reshape(10, 10)), ValueError, "1-D token stream"),
        (dict(tokens=torch.arange(100, dtype=torch.int32)), TypeError, "torch.long"),
        (dict(tokens=list(range(100))), TypeError, "torch.Tensor"),
        (dict(tokens=torch.arange(100), seq_len=0), ValueError, "seq_len must be a positive int"),
        (dict(tokens=torch.arange(100), seq_len=1), ValueError, "at least 2"),
        (dict(tokens=torch.arange(100), seq_len=10.0), ValueError, "seq_len must be a positive int"),
        (dict(tokens=torch.arange(100), n_samples=-1), ValueError, "n_samples must be a positive int"),
    ],
)
def test_sample_windows_rejects_bad_input(kwargs, error, match):
    kwargs = {"seq_len": 10, "n_samples": 2, "seed": 0, **kwargs}
    with pytest.raises(error, match=match):
        sample_windows(**kwargs)


# ------------------------------------------------------------------ perplexity


@pytest.mark.parametrize("vocab", [7, 256, 49152])
def test_uniform_model_has_perplexity_vocab(vocab):
    tokens = torch.randint(0, vocab, (4096,), generator=torch.Generator().manual_seed(0))
    mean = nll(Uniform(vocab), tokens, seq_len=64, n_samples=16, batch_size=5, progress=False)
    # Every predicted token costs the float32 log-softmax of a uniform row, and
    # a float64 mean of identical values is that value exactly.
    assert mean == -F.log_softmax(torch.zeros(vocab), dim=-1)[0].item()
    ppl = perplexity(Uniform(vocab), tokens, seq_len=64, n_samples=16, progress=False)
    # log(V) is rounded to float32 (relative error <= 2^-24, absolute <= log(V) * 2^-24,
    # plus an ulp from the log kernel), and exp turns an absolute error e into a
    # relative error of about e: 2 * log(V) * 2^-23 bounds it.
    assert ppl == pytest.approx(vocab, rel=2 * math.log(vocab) * 2**-23)


def test_known_next_token_model_has_nll_log2():
    vocab = 10
    tokens = torch.arange(2000) % vocab
    mean = nll(NextTokenHalf(vocab), tokens, seq_len=50, n_samples=40, batch_size=7, progress=False)
    # float32 log-softmax of log-probabilities: a few ulps of float32 around log(2).
    assert mean == pytest.approx(math.log(2), rel=1e-6)


def test_hf_model_matches_hand_computation_and_reused_windows():
    model = tiny_llama()
    tokens = torch.randint(0, 64, (3000,), generator=torch.Generator().manual_seed(1))
    windows = sample_windows(tokens, seq_len=32, n_samples=12, seed=5)
    with torch.no_grad():
        logits = model(windows).logits.double()
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 64), windows[:, 1:].reshape(-1)).item()
    got = nll(model, windows=windows, batch_size=5, progress=False)
    # The same float32 forward, batched differently, and a float32 vs float64
    # log-softmax: agreement to ~1e-6 relative is what float32 allows.
    assert got == pytest.approx(expected, rel=1e-5)
    # Passing the stream with the same seed samples the same windows.
    assert nll(model, tokens, seq_len=32, n_samples=12, seed=5, batch_size=5, progress=False) == got
    assert perplexity(model, windows=windows, batch_size=5, progress=False) == pytest.approx(math.exp(got), rel=1e-12)


def test_window_nlls_are_each_windows_own_mean_and_average_to_nll():
    model = tiny_llama()
    tokens = torch.randint(0, 64, (3000,), generator=torch.Generator().manual_seed(3))
    windows = sample_windows(tokens, seq_len=32, n_samples=11, seed=2)
    per_window = window_nlls(model, windows, batch_size=4)  # 11 windows: batches of 4, 4 and 3
    assert per_window.shape == (11,) and per_window.dtype == torch.float64
    with torch.no_grad():
        logits = model(windows).logits.double()
    for i in (0, 5, 10):  # the first, a middle one (second batch) and the last (short batch)
        expected = F.cross_entropy(logits[i, :-1], windows[i, 1:]).item()
        assert per_window[i].item() == pytest.approx(expected, rel=1e-5)
    # the windows are all one length: their mean is the mean over every token
    assert per_window.mean().item() == pytest.approx(nll(model, windows=windows, progress=False), rel=1e-12)
    # each window is scored alone: a different batching gives the same values
    assert torch.allclose(per_window, window_nlls(model, windows, batch_size=11), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="torch.long tensor"):
        window_nlls(model, windows.float())


def test_training_mode_model_is_evaluated_without_dropout_and_restored():
    model = tiny_llama(attention_dropout=0.5)
    tokens = torch.randint(0, 64, (2000,), generator=torch.Generator().manual_seed(2))
    reference = nll(model, tokens, seq_len=32, n_samples=8, progress=False)
    model.train()
    assert nll(model, tokens, seq_len=32, n_samples=8, progress=False) == reference
    assert model.training


def test_non_finite_logits_give_non_finite_perplexity_not_an_error():
    class Nan(Uniform):
        def forward(self, input_ids):
            return torch.full((*input_ids.shape, self.vocab), float("nan"))

    assert math.isnan(perplexity(Nan(5), torch.arange(100) % 5, seq_len=10, n_samples=3, progress=False))


def test_bad_model_output_and_arguments_are_clear_errors():
    tokens = torch.arange(100) % 5
    with pytest.raises(TypeError, match="logits tensor"):
        nll(lambda ids: "nope", tokens, seq_len=10, n_samples=2, progress=False)
    with pytest.raises(ValueError, match=r"expected \[batch, seq_len, vocab\]"):
        nll(lambda ids: torch.zeros(ids.shape[0], 5), tokens, seq_len=10, n_samples=2, progress=False)
    with pytest.raises(ValueError, match="exactly one of"):
        nll(Uniform(5), tokens, windows=torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of"):
        nll(Uniform(5))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        nll(Uniform(5), tokens, seq_len=10, n_samples=2, batch_size=0)
    with pytest.raises(ValueError, match=r"\[n, seq_len\] torch.long"):
        nll(Uniform(5), windows=torch.zeros(10, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_gets_its_windows_on_its_device():
    model = tiny_llama()
    tokens = torch.randint(0, 64, (2000,), generator=torch.Generator().manual_seed(3))
    on_cpu = nll(model, tokens, seq_len=32, n_samples=8, progress=False)
    on_gpu = nll(model.cuda(), tokens, seq_len=32, n_samples=8, progress=False)
    # Different float32 kernels (TF32 off by default for matmul): ~1e-6 relative.
    assert on_gpu == pytest.approx(on_cpu, rel=1e-4)
