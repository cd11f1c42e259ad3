"""Tiny random-weight causal LMs built in code (no hub): hidden 64, 2 layers, vocab 128.

``captured(arch, attn)`` caches one capture per (architecture, attention) for the
whole test session, so test files share the export cost.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from mpqc.capture import capture

VOCAB = 128
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
TOP_K = 2
EXPERTS = 4

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "opt", "gpt2", "gpt_neox", "mixtral")
# transformers 5 refuses attn_implementation="sdpa" for Gemma2 (its attention logit softcapping).
SDPA_UNSUPPORTED = {"gemma2"}
ARCH_ATTN = [(a, attn) for a in ARCHS for attn in ("sdpa", "eager") if not (attn == "sdpa" and a in SDPA_UNSUPPORTED)]

EXAMPLE_SHAPE = (2, 8)  # capture's example input: reference batch 2, sequence 8


def tiny_config(arch: str, attn: str = "sdpa", **overrides):
    if arch == "gpt2":
        kw = dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64)
    elif arch == "opt":
        kw = dict(
            hidden_size=HIDDEN,
            ffn_dim=2 * HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=64,
            word_embed_proj_dim=HIDDEN,
        )
    elif arch == "gpt_neox":
        kw = dict(
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=64,
        )
    else:
        kw = dict(
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            head_dim=HEAD_DIM,
        )
        if arch == "mixtral":
            kw.update(num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    # Special token ids inside the tiny vocabulary (the defaults index a 32k/50k one).
    kw.update(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    config = AutoConfig.for_model(arch, **kw)
    config._attn_implementation = attn
    return config


def tiny_model(arch: str, attn: str = "sdpa", *, seed: int = 0, experts: str | None = None) -> nn.Module:
    """A tiny model in eval mode; ``experts`` picks transformers' experts_implementation for MoE."""
    torch.manual_seed(seed)
    kwargs = {"experts_implementation": experts} if experts else {}
    return AutoModelForCausalLM.from_config(tiny_config(arch, attn), **kwargs).eval()


def example_ids(shape=EXAMPLE_SHAPE, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@functools.cache
def captured(arch: str, attn: str = "sdpa", experts: str | None = None):
    """(model, graph) for a tiny model, captured once per session."""
    model = tiny_model(arch, attn, experts=experts)
    return model, capture(model, (example_ids(),))


def hand_count_matmul_params(model: nn.Module) -> int:
    """Elements of every 2-D/3-D weight the model multiplies by, counted from its modules.

    Every parameter of rank >= 2 except embeddings that are only looked up; a tied
    lm_head shares the token embedding and counts once.
    """
    head = model.get_output_embeddings().weight
    looked_up = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)} - {id(head)}
    # named_parameters() yields a shared (tied) tensor once.
    return sum(p.numel() for _, p in model.named_parameters() if p.dim() >= 2 and id(p) not in looked_up)


# ---- small hand-written modules for cases transformers models do not show --------------


class Branchy(nn.Module):
    """Data-dependent control flow: torch.export cannot trace it."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class BranchyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.gate = Branchy()

    def forward(self, x):
        return self.gate(self.proj(x))


class BranchyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList([BranchyBlock()])
        self.lm_head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


class SharedWeightBlock(nn.Module):
    """Multiplies by ``weight.T`` through aten.matmul, twice with one weight."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Parameter(torch.randn(HIDDEN, HIDDEN) / HIDDEN**0.5)

    def forward(self, x):
        return torch.tanh(x @ self.shared.t()) @ self.shared.t()


class SharedWeightLM(nn.Module):
    """A head tied to the embedding through F.linear outside any lm_head module, returning a tuple."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList([SharedWeightBlock() for _ in range(LAYERS)])

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return (F.linear(h, self.embed.weight),)


class Attention(nn.Module):
    """Calls F.scaled_dot_product_attention with the given options (for DecomposeAttention)."""

    def __init__(self, **sdpa_kwargs):
        super().__init__()
        self.sdpa_kwargs = sdpa_kwargs

    def forward(self, q, k, v, attn_mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **self.sdpa_kwargs)
