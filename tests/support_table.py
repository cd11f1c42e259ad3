"""The support table: every causal LM type in transformers' auto mapping, built tiny, through mpqc.

    python tests/support_table.py              # walk every type; write docs/architectures.md and .json
    python tests/support_table.py llama falcon # walk these types; print their rows
    python tests/support_table.py --update zaya  # walk these types; replace their rows in the table

Each model type gets a tiny config (TINY applied to the keys its default config has, a
short ``layer_types`` with one layer of each kind, then OVERRIDES for the types whose
defaults do not build), random weights and eager attention, and goes through:

1. ``forward``: the HF model's own forward on the example and on a new shape. A type whose
   own forward fails is listed as such ("hf-fails"), not counted against mpqc.
2. ``capture``: a CaptureError or AnalysisError is a refusal with its reason ("refused").
3. ``params``: the matmul parameters of the graph equal, tensor for tensor, what the HF
   forward multiplies by, as a TorchFunctionMode sees it (``multiplied_tensors``).
4. ``fp32``: the fp32 plan on a new shape equals the graph bit for bit and the HF logits
   to float32 rounding.
5. ``w4a4``: weights and activations in MXINT4 on a new shape give finite logits.
6. ``w4``: weight-only MXINT4 (activations untouched) equals the HF model with its weights
   quantized by hand, where every matmul weight is a plain Linear or Conv1D.

A type that passes all is "supported"; one that captures but fails a check is "wrong"
(silently wrong: the target is to have none); an exception of another kind from mpqc is
"error". tests/test_support_table.py runs the walk and compares it with the committed table.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import signal
import sys
import time
import traceback
import warnings
import weakref
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
TABLE_MD = ROOT / "docs" / "architectures.md"
TABLE_JSON = ROOT / "docs" / "architectures.json"

VOCAB = 128
H = 32
EXAMPLE_SHAPE = (2, 8)
NEW_SHAPE = (3, 11)
# Per type, in CPU seconds of the process walking it (so a busy machine does not time types
# out): the slowest, linear attention exported as a 63-step loop, take about 40. A wall-clock
# limit backs it up for a type that hangs without computing.
TIMEOUT_CPU_S = 150
TIMEOUT_WALL_S = 900
# Logits of the compiled fp32 plan against the HF model: the eager graphs run the model's
# own ops, so they agree to float32 rounding through one or two tiny layers (measured below
# 1e-6 on every type); 1e-5 absolute / 1e-4 relative leaves margin and is still far below the
# differences a lost weight or a wrong axis makes (1e-2 and up).
ATOL, RTOL = 1e-5, 1e-4

# Size keys shrunk wherever a default config has them (int-valued).
TINY = {
    **dict.fromkeys(
        (
            "hidden_size",
            "d_model",
            "n_embd",
            "embed_dim",
            "emb_dim",
            "embedding_dim",
            "embedding_size",
            "word_embed_proj_dim",
            "input_embedding_size",
            "output_embedding_size",
            "lru_width",
        ),
        H,
    ),
    **dict.fromkeys(
        (
            "intermediate_size",
            "ffn_dim",
            "d_ff",
            "n_inner",
            "dim_ff",
            "dff",
            "ffn_hidden_size",
            "dense_intermediate_size",
            "intermediate_size_mlp",
            "feed_forward_size",
            "decoder_ffn_dim",
            "encoder_ffn_dim",
        ),
        2 * H,
    ),
    **dict.fromkeys(
        (
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "moe_shared_expert_intermediate_size",
            "shared_intermediate_size",
            "shared_experts_intermediate_size",
            "expert_ffn_hidden_size",
        ),
        H,
    ),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers"), 1),
    **dict.fromkeys(
        ("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads", "encoder_attention_heads"),
        4,
    ),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "num_query_groups"), 2),
    **dict.fromkeys(
        (
            "head_dim",
            "attention_head_dim",
            "d_head",
            "dim_head",
            "kv_channels",
            "attention_head_size",
            "qk_rope_head_dim",
            "qk_nope_head_dim",
            "v_head_dim",
            "rotary_dim",
        ),
        8,
    ),
    **dict.fromkeys(("vocab_size",), VOCAB),
    # Long enough that capture's shape-guard probes (up to half of it) cross chunk sizes of 64 to 256.
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"), 1024),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token"), 2),
    **dict.fromkeys(("q_lora_rank", "kv_lora_rank", "o_lora_rank"), 16),
    **dict.fromkeys(("state_size", "ssm_state_size", "mamba_d_state"), 8),
    **dict.fromkeys(("time_step_rank", "mamba_dt_rank"), 4),
    **dict.fromkeys(("mamba_n_heads", "mamba_num_heads"), 4),
    **dict.fromkeys(("mamba_d_head", "mamba_head_dim", "mamba_headdim"), 16),
    **dict.fromkeys(("chunk_size", "mamba_chunk_size"), 8),
    **dict.fromkeys(("linear_key_head_dim", "linear_value_head_dim", "index_head_dim"), 8),
    **dict.fromkeys(
        (
            "n_group",
            "topk_group",
            "num_expert_group",
            "topk_expert_group",
            "n_groups",
            "mamba_n_groups",
            "mamba_ngroups",
        ),
        1,
    ),
    **dict.fromkeys(
        (
            "adapter_in_dim",
            "adapter_out_dim",
            "adapter_input_size",
            "adapter_output_size",
            "hidden_size_global",
            "downsample_hidden_size",
        ),
        H,
    ),
    "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 8,
    "hc_lowrank": 8,
    "qk_head_dim": 16,
    "linear_head_dim": 8,
    "linear_num_heads": 4,
    "moe_topk": 2,
    "zero_expert_num": 2,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "index_n_heads": 2,
    "index_topk": 4,
    "mamba_d_ssm": 64,
}
LAYER_PATTERN_KEYS = ("layer_types", "mlp_layer_types", "layers_block_type")
SUB_CONFIGS = (
    "text_config",
    "decoder",
    "vision_config",
    "audio_config",
    "patcher_config",
    "encoder_config",
    "decoder_config",
    "global_config",
    "attn_config",
    "ffn_config",
)
SPECIAL_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

# Per type, what the shrunk defaults get wrong ("sub.key" sets a key of a sub-config).
OVERRIDES: dict[str, dict] = {
    "blt": {"encoder_hash_byte_group_vocab": VOCAB, "max_patch_length": 4},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "dbrx": {
        "attn_config.rope_theta": 10000.0,
        "attn_config.kv_n_heads": 2,
        "ffn_config.ffn_hidden_size": 2 * H,
        "ffn_config.hidden_size": H,
        "ffn_config.moe_num_experts": 4,
        "ffn_config.moe_top_k": 2,
        "attn_config.clip_qkv": 8.0,
    },
    "deepseek_v2": {"num_experts_per_tok": 2},
    # Dory's dict doubles its layer counts (an attention and an mlp block per decoder layer).
    "dory": {
        "n_input_layers": 2,
        "n_recurrent_layers": 2,
        "n_output_layers": 2,
        "n_recurrent_loops": 1,
        "num_hidden_layers": 6,
        "layer_types": ["sliding_attention", "mlp", "full_attention", "mlp", "sliding_attention", "mlp"],
    },
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "dots3_note_text": {"head_dim": 16},
    "dots3_note": {"text_config.head_dim": 16},
    "gemma3n_text": {"num_kv_shared_layers": 0, "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": VOCAB},
    "gemma3n": {
        "text_config.num_kv_shared_layers": 0,
        "text_config.hidden_size_per_layer_input": 8,
        "text_config.vocab_size_per_layer_input": VOCAB,
    },
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
    "gpt_neo": {
        "num_layers": 2,
        "attention_types": [[["global", "local"], 1]],
        "attention_layers": ["global", "local"],
    },
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"], "num_hidden_layers": 2},
    "hrm_text": {"H_cycles": 1, "L_cycles": 1, "L_bp_cycles": [1], "num_layers_per_stack": 1, "num_hidden_layers": 2},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_hidden_layers": 2},
    "mamba2": {"head_dim": 16},
    "nemotron": {"num_key_value_heads": 2},
    "qwen4_exp": {
        "text_config.ngram_vocab_size_base": VOCAB,
        "text_config.indexer_n_heads": 2,
        "text_config.indexer_kv_heads": 1,
        "text_config.indexer_head_dim": 8,
        "text_config.indexer_budget": 4,
        "text_config.indexer_compress_ratio": 2,
        "text_config.ple_embed_dim": H,
    },
    "qwen4_exp_text": {
        "ngram_vocab_size_base": VOCAB,
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 8,
        "indexer_budget": 4,
        "indexer_compress_ratio": 2,
        "ple_embed_dim": H,
    },
    "reformer": {
        "is_decoder": True,
        "axial_pos_shape": [8, 8],
        "axial_pos_embds_dim": [16, 16],
        "local_attn_chunk_length": 4,
        "lsh_attn_chunk_length": 4,
        "attn_layers": ["local", "lsh"],
        "num_hidden_layers": 2,
        "max_position_embeddings": 64,
    },  # axial: 8 x 8 positions
    "rwkv": {"num_hidden_layers": 2, "attention_hidden_size": H},
    "xlstm": {"num_blocks": 1, "chunk_size": 8},
    "xmod": {"default_language": "en_XX"},
    "zaya": {"num_experts_per_tok": 1},
    "zamba": {
        "layers_block_type": ["linear_attention", "hybrid", "hybrid"],
        "num_hidden_layers": 3,
        "attention_hidden_size": 2 * H,
    },
    "zamba2": {"n_mamba_heads": 4, "attention_hidden_size": 2 * H, "attention_head_dim": 16, "hybrid_layer_ids": [1]},
}


# ---- building a tiny model ------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shrink(d: dict) -> None:
    """Shrink a config dict in place: TINY sizes, special tokens in the vocabulary, one layer per kind."""
    layers_before = d.get("num_hidden_layers")
    for key, value in TINY.items():
        if _is_int(d.get(key)):
            d[key] = value
    for key, value in SPECIAL_TOKENS.items():
        if _is_int(d.get(key)):
            d[key] = value
    if "head_dim" in d and d["head_dim"] is None:
        d["head_dim"] = TINY["head_dim"]  # None means hidden / heads, which some code reads as is
    if _is_int(d.get("kv_lora_rank")) and "num_key_value_heads" in d:
        d["num_key_value_heads"] = d["num_attention_heads"]  # MLA: every head has its own key and value
    patterns = [k for k in LAYER_PATTERN_KEYS if isinstance(d.get(k), list)]
    first = [0] * (TINY["num_hidden_layers"])  # the original layers the tiny ones stand for
    if patterns:
        # One layer of each kind, in order of first appearance, in every pattern.
        kinds = {k: list(dict.fromkeys(d[k])) for k in patterns}
        n = max(len(v) for v in kinds.values())
        first = [d[patterns[0]].index(kinds[patterns[0]][i % len(kinds[patterns[0]])]) for i in range(n)]
        for k in patterns:
            d[k] = [kinds[k][i % len(kinds[k])] for i in range(n)]
        if "num_hidden_layers" in d:
            d["num_hidden_layers"] = n
        if isinstance(d.get("per_layer_config"), dict):  # the chosen layers keep their own settings
            old = {int(k): v for k, v in d["per_layer_config"].items()}
            d["per_layer_config"] = {str(i): old[j] for i, j in enumerate(first) if j in old}
            for layer in d["per_layer_config"].values():
                _shrink(layer)
    for key, value in list(d.items()):  # other per-layer lists: the chosen layers' entries
        if (
            key not in patterns
            and isinstance(value, list)
            and _is_int(layers_before)
            and len(value) == layers_before > 1
        ):
            d[key] = [value[j] for j in first]
    layers = d.get("num_hidden_layers")
    for key, value in TINY.items():  # sizes given per layer
        if isinstance(d.get(key), list) and d[key] and all(_is_int(v) for v in d[key]) and _is_int(layers):
            d[key] = [value] * layers
    for name in SUB_CONFIGS:
        if isinstance(d.get(name), dict):
            _shrink(d[name])


def _set(d: dict, key: str, value) -> None:
    *path, last = key.split(".")
    for part in path:
        d = d[part]
    d[last] = value


def tiny_config(model_type: str):
    """The default config of ``model_type``, shrunk, with its OVERRIDES ("sub.key" for a sub-config's key).

    The config is built from the final dict, so its own validation sees the tiny sizes."""
    from transformers import AutoConfig

    overrides = OVERRIDES.get(model_type, {})
    try:
        default = AutoConfig.for_model(model_type)
    except Exception:  # noqa: BLE001 - a default its own validation rejects: build it with the overrides
        default = AutoConfig.for_model(model_type, **{k: v for k, v in overrides.items() if "." not in k})
    d = default.to_dict()
    _shrink(d)
    for key, value in overrides.items():
        _set(d, key, value)
    return type(default).from_dict(d)


def tiny_model(model_type: str, seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation="eager").eval()


def token_ids(shape, seed: int) -> torch.Tensor:
    # Ids from 3 up: clear of the special tokens (0, 1, 2), which some models treat apart.
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _forward_kwargs(model: nn.Module) -> dict:
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


def hf_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids, **_forward_kwargs(model))
    return out.logits if hasattr(out, "logits") else out[0]


# ---- what the HF forward multiplies by ---------------------------------------------------------

# torch functions that multiply matrices, with the argument positions of the two factors.
_MATMUL_FUNCTIONS = {
    "linear": (0, 1),
    "matmul": (0, 1),
    "__matmul__": (0, 1),
    "__rmatmul__": (0, 1),
    "mm": (0, 1),
    "bmm": (0, 1),
    "mv": (0, 1),
    "_grouped_mm": (0, 1),
    "grouped_mm_fallback": (0, 1),
    "addmm": (1, 2),
    "baddbmm": (1, 2),
    "addbmm": (1, 2),
    "einsum": None,
    "bilinear": None,
    "tensordot": (0, 1),
}
_LOOKUPS = {"embedding"}


def _function_name(func) -> str:
    schema = getattr(func, "_schema", None)
    if schema is not None:
        return schema.name.split("::")[-1]
    return getattr(func, "__name__", str(func))


class _MultipliedTensors(TorchFunctionMode):
    """Records the model tensors (parameters, buffers of rank >= 2) that reach a matmul's factors.

    A tensor computed only from model tensors (any op; integer tensors such as expert ids
    do not count as activations) is derived from them; an embedding lookup's rows are
    activations. Whatever derived tensor reaches a factor of a matmul function counts."""

    def __init__(self, model: nn.Module):
        super().__init__()
        named = dict(model.named_parameters())
        named.update(dict(model.named_buffers()))
        self.sources = {id(t): (name, t) for name, t in named.items() if t.is_floating_point() and t.dim() >= 2}
        self.by_name = {name: t for name, t in self.sources.values()}
        self.derived: dict[int, tuple[weakref.ref, frozenset]] = {}
        self.multiplied: dict[tuple, tuple[str, int]] = {}

    def _origin(self, t: torch.Tensor):
        """frozenset of model-tensor names ``t`` is computed from, or None if it is an activation."""
        if id(t) in self.sources:
            return frozenset([self.sources[id(t)][0]])
        ref, names = self.derived.get(id(t), (None, None))
        if ref is not None and ref() is t:
            return names
        return None if (t.is_floating_point() or t.is_complex()) else frozenset()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _function_name(func)
        flat = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        origins = [self._origin(t) for t in flat]
        if name in _MATMUL_FUNCTIONS:
            positions = _MATMUL_FUNCTIONS[name]
            factors = flat if positions is None else [args[i] for i in positions if i < len(args)]
            for f in factors:
                if isinstance(f, torch.Tensor):
                    for source in self._origin(f) or ():
                        t = self.by_name[source]
                        self.multiplied[_storage_key(t)] = (source, t.numel())
        if name not in _LOOKUPS and None not in origins:
            names = frozenset().union(*origins) if origins else frozenset()
            if names:
                for o in tree_flatten(out)[0]:
                    if isinstance(o, torch.Tensor):
                        self.derived[id(o)] = (weakref.ref(o), names)
        return out


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def multiplied_tensors(model: nn.Module, ids: torch.Tensor) -> dict[tuple, tuple[str, int]]:
    """Storage key -> (name, elements) of every model tensor the HF forward multiplies by."""
    mode = _MultipliedTensors(model)
    with torch.no_grad(), mode:
        model(ids, **_forward_kwargs(model))
    return mode.multiplied


# ---- the checks -----------------------------------------------------------------------------

STATUSES = ("supported", "refused", "hf-fails", "wrong", "error", "timeout")


@dataclasses.dataclass
class Row:
    model_type: str
    status: str = "error"
    reason: str = ""
    model_class: str = ""
    roles: tuple[str, ...] = ()
    matmuls: int = 0
    params: int | None = None  # matmul parameters of the captured graph
    expected_params: int | None = None  # elements of the tensors the HF forward multiplies by
    fp32_max_diff: float | None = None  # compiled fp32 plan vs the HF logits, new shape
    w4: str = ""  # weight-only MXINT4 against hand-quantized weights
    seconds: float = 0.0  # wall clock
    cpu_seconds: float = 0.0  # this process's CPU time: the cost on a quiet machine


class _Timeout(Exception):
    pass


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _timed_out(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, _Timeout):
            return True
        e = e.__cause__ or e.__context__
    return False


def check(model_type: str) -> Row:
    """Walk one model type through the checks; never raises (the row says what happened)."""
    row, start, cpu = Row(model_type), time.monotonic(), time.process_time()
    try:
        _check(row)
    except Exception as e:  # noqa: BLE001 - recorded in the row
        row.status, row.reason = (
            ("timeout", f"over {TIMEOUT_CPU_S} CPU s or {TIMEOUT_WALL_S} s")
            if _timed_out(e)
            else ("error", _first_line(e))
        )
        row.reason += f" [{traceback.extract_tb(e.__traceback__)[-1].name}]" if row.status == "error" else ""
    row.seconds = round(time.monotonic() - start, 1)
    row.cpu_seconds = round(time.process_time() - cpu, 1)
    return row


def _check(row: Row) -> None:
    from mpqc.capture import CaptureError, capture
    from mpqc.passes.analysis import AnalysisError

    example, new = token_ids(EXAMPLE_SHAPE, 1), token_ids(NEW_SHAPE, 2)
    try:
        model = tiny_model(row.model_type)
        row.model_class = type(model).__name__
        hf_logits(model, example)
        reference = hf_logits(model, new)
    except Exception as e:  # noqa: BLE001 - HF's own failure, recorded
        if _timed_out(e):
            raise
        row.status, row.reason = "hf-fails", _first_line(e)
        return
    try:
        graph = capture(model, (example,))
    except (CaptureError, AnalysisError) as e:
        if _timed_out(e):
            raise
        row.status, row.reason = "refused", _first_line(e, 600)
        return
    row.roles = tuple(sorted({m.role for m in graph.matmuls}))
    row.matmuls, row.params = len(graph.matmuls), graph.total_params
    problems = _check_params(row, model, graph, example)
    problems += _check_plans(row, model, graph, new, reference)
    row.status = "wrong" if problems else "supported"
    row.reason = "; ".join(problems)


def _check_params(row: Row, model, graph, example) -> list[str]:
    from mpqc.graph import weight_tensor

    expected = multiplied_tensors(model, example)
    row.expected_params = sum(numel for _, numel in expected.values())
    found = {_storage_key(weight_tensor(graph.module, m.weight)): m.weight for m in graph.matmuls if m.has_weight}
    problems = []
    missing = sorted(name for key, (name, _) in expected.items() if key not in found)
    extra = sorted(name for key, name in found.items() if key not in expected)
    if missing:
        problems.append(f"weights the model multiplies by but the graph does not: {missing}")
    if extra:
        problems.append(f"graph weights the model does not multiply by: {extra}")
    if row.params != row.expected_params:
        problems.append(f"matmul parameters {row.params:,} != {row.expected_params:,}")
    return problems


def _check_plans(row: Row, model, graph, new, reference) -> list[str]:
    import mpqc

    problems = []
    fp32 = mpqc.compile(graph, mpqc.Plan.uniform(graph, "fp32"))(new)
    row.fp32_max_diff = float((fp32 - reference).abs().max())
    if not torch.equal(fp32, graph.module(new)):
        problems.append("the fp32 plan differs from the captured graph")
    if fp32.shape != reference.shape or not torch.allclose(fp32, reference, atol=ATOL, rtol=RTOL):
        problems.append(f"fp32 logits differ from the model's by {row.fp32_max_diff:.2e}")
    w4a4 = mpqc.compile(graph, mpqc.Plan.uniform(graph, "mxint4"))(new)
    if not torch.isfinite(w4a4).all():
        problems.append("W+A MXINT4 logits are not finite")
    hand = _hand_quantized(model, graph)
    if isinstance(hand, str):
        row.w4 = hand
    else:
        got = mpqc.compile(graph, mpqc.Plan.uniform(graph, "mxint4", activations=False, high="fp32"))(new)
        expected = hf_logits(hand, new)
        diff = float((got - expected).abs().max())
        row.w4 = f"equal (max diff {diff:.1e})" if torch.allclose(got, expected, atol=ATOL, rtol=RTOL) else ""
        if not row.w4:
            problems.append(f"weight-only MXINT4 differs from hand-quantized weights by {diff:.2e}")
            row.w4 = f"differs by {diff:.2e}"
    return problems


def _hand_quantized(model: nn.Module, graph) -> nn.Module | str:
    """A copy of the model with every matmul weight quantized by hand, or why there is none.

    nn.Linear weights are [out, in] (quantized along axis 1), GPT-2's Conv1D [in, out]
    (axis 0); a head tied to the embedding is untied first, since the lookup keeps the
    float embedding. Types with other matmul weights (stacked experts ...) get none."""
    from transformers.pytorch_utils import Conv1D

    from mpqc.formats import quantize

    clone = copy.deepcopy(model)
    head, embed = clone.get_output_embeddings(), clone.get_input_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    if tied:
        head.weight = nn.Parameter(head.weight.detach().clone())
    modules = dict(clone.named_modules())
    axes = {}
    for m in graph.matmuls:
        if not m.has_weight:
            continue
        owner = modules.get(m.weight.rsplit(".", 1)[0])
        if tied and owner is embed:
            owner = head
        if isinstance(owner, nn.Linear):
            axes[id(owner.weight)] = (owner.weight, 1)
        elif isinstance(owner, Conv1D):
            axes[id(owner.weight)] = (owner.weight, 0)
        else:
            return f"n/a ({m.weight.rsplit('.', 1)[-1]} of {type(owner).__name__})"
    with torch.no_grad():
        for weight, axis in axes.values():
            weight.copy_(quantize(weight, "mxint4", axis=axis))
    return clone


# ---- walking every type ---------------------------------------------------------------------


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _alarm(signum, frame):
    raise _Timeout()


def _init_worker() -> None:
    torch.set_num_threads(1)  # two workers on two cores
    warnings.simplefilter("ignore")
    import transformers  # noqa: F401

    import mpqc  # noqa: F401 - the heavy imports, once per worker


def _check_with_timeout(model_type: str) -> Row:
    previous = {sig: signal.signal(sig, _alarm) for sig in (signal.SIGALRM, signal.SIGPROF)}
    signal.setitimer(signal.ITIMER_PROF, TIMEOUT_CPU_S)
    signal.alarm(TIMEOUT_WALL_S)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return check(model_type)
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.alarm(0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def walk(types: list[str], workers: int | None = None, progress=None) -> list[Row]:
    """Check every type, in order; in ``workers`` spawned processes (default: MPQC_SUPPORT_WORKERS, else
    2 where there are 2 CPUs), or in this process with ``workers=1``."""
    workers = workers or int(os.environ.get("MPQC_SUPPORT_WORKERS", min(2, os.cpu_count() or 1)))
    rows = []
    if workers <= 1:
        for t in types:
            rows.append(_check_with_timeout(t))
            if progress:
                progress(rows[-1])
        return rows
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # a fork of a process running torch threads can hang
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
        for row in pool.map(_check_with_timeout, types):
            rows.append(row)
            if progress:
                progress(row)
    return rows


def counts(rows: list[Row]) -> dict[str, int]:
    return {"total": len(rows), **{s: sum(r.status == s for r in rows) for s in STATUSES}}


def _versions() -> dict[str, str]:
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}


def write_table(rows: list[Row], md: Path = TABLE_MD, js: Path = TABLE_JSON) -> None:
    """docs/architectures.md (for people) and .json (for the test), each written to a temp file, then renamed."""
    versions = _versions()
    data = {"versions": versions, "counts": counts(rows), "rows": [dataclasses.asdict(r) for r in rows]}
    for path, text in ((js, json.dumps(data, indent=1) + "\n"), (md, render_markdown(rows, versions))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


_STATUS_TEXT = {
    "supported": "supported",
    "refused": "refused at capture",
    "hf-fails": "HF forward fails",
    "wrong": "WRONG (silently)",
    "error": "mpqc error",
    "timeout": "timed out",
}


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(rows: list[Row], versions: dict[str, str] | None = None) -> str:
    c, v = counts(rows), versions or _versions()
    lines = [
        "# Architectures",
        "",
        "Every model type in transformers' causal-LM auto mapping (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), built",
        f"tiny (hidden size {H}, one decoder layer of each kind, vocabulary {VOCAB}, random weights, eager",
        "attention, float32) and walked through mpqc. Generated by `python tests/support_table.py` with",
        f"transformers {v['transformers']} and torch {v['torch']}; `tests/test_support_table.py` runs the same",
        "walk in CI and compares it with this table.",
        "",
        "A type is **supported** when its HF forward runs, mpqc captures it, the graph's matmul parameters",
        "are exactly the tensors the HF forward multiplies by (seen by a TorchFunctionMode, a tied head",
        "once, embeddings that are only looked up left out), the fp32 plan reproduces the HF logits on a",
        f"new shape ({NEW_SHAPE[0]} x {NEW_SHAPE[1]} against the example's {EXAMPLE_SHAPE[0]} x "
        f"{EXAMPLE_SHAPE[1]}), W+A MXINT4 gives finite logits there, and weight-only",
        "MXINT4 equals the model with hand-quantized weights (checked where every matmul weight is a plain",
        "`Linear` or `Conv1D`). **Refused at capture** means mpqc raised a `CaptureError` or `AnalysisError`",
        "saying why, instead of building a graph that would be wrong. **HF forward fails** means the model's",
        "own forward fails on the tiny config; those are not counted against mpqc.",
        "",
        "| types | HF forward fails | supported | refused at capture | silently wrong | mpqc error | timed out |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {c['total']} | {c['hf-fails']} | {c['supported']} | {c['refused']} | {c['wrong']} | {c['error']} "
        f"| {c['timeout']} |",
        "",
        *_refusal_summary(rows),
        "",
        "| type | model class | status | roles found | matmul params (graph / HF) | notes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        params = "" if r.params is None else f"{r.params:,} / {r.expected_params:,}"
        notes = _short(r.reason) or (f"weight-only: {r.w4}" if r.w4 else "")
        lines.append(
            f"| `{r.model_type}` | {_cell(r.model_class)} | {_STATUS_TEXT[r.status]} | {_cell(', '.join(r.roles))} "
            f"| {params} | {_cell(notes)} |"
        )
    return "\n".join(lines) + "\n"


# What a refusal's reason says, in a few words: (text in the reason, summary).
_REFUSAL_KINDS = (
    ("specialized the sequence dimension", "sequence length fixed by the model's code (a Python loop over positions)"),
    ("specialized the batch dimension", "batch size fixed by the model's code"),
    ("only holds for some of them", "sequence length bounded or stepped by the model's code (chunked scans, blocks)"),
    ("inside subgraph", "a weight multiplied inside a torch.no_grad region (sparse-attention indexers)"),
    ("data-dependent", "torch.export fails on data-dependent control flow (expert loops)"),
    ("depends on {u", "a matmul's size depends on the data (token-dependent expert batches)"),
    ("DynamicCache", "the model returns a KV cache export cannot represent"),
)


def refusal_kind(reason: str) -> str:
    return next((summary for text, summary in _REFUSAL_KINDS if text in reason), "other")


def _refusal_summary(rows: list[Row]) -> list[str]:
    kinds: dict[str, list[str]] = {}
    for r in rows:
        if r.status == "refused":
            kinds.setdefault(refusal_kind(r.reason), []).append(f"`{r.model_type}`")
    lines = ["", "Why types are refused:", "", "| reason | types |", "| --- | --- |"]
    lines += [f"| {kind} ({len(types)}) | {', '.join(types)} |" for kind, types in kinds.items()]
    return lines


def _short(text: str, limit: int = 320) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_table(js: Path = TABLE_JSON) -> tuple[dict, list[Row]]:
    """The committed table: (its versions and counts, its rows)."""
    data = json.loads(js.read_text())
    return data, [Row(**{**r, "roles": tuple(r["roles"])}) for r in data["rows"]]


def main(argv: list[str]) -> int:
    """No arguments: walk every type and write the table. Types: walk those and print their rows.
    ``--update`` types: walk those and replace their rows in the committed table."""
    update = argv[:1] == ["--update"]
    types = argv[1:] if update else argv or causal_lm_types()
    start = time.monotonic()

    def show(row: Row) -> None:
        print(
            f"{row.model_type:28s} {row.seconds:6.1f}s {row.cpu_seconds:6.1f}cpu {row.status:9s} {row.reason[:160]}",
            flush=True,
        )

    rows = walk(types, progress=show)
    print(counts(rows), f"{time.monotonic() - start:.0f} s")
    if update:
        walked = {r.model_type: r for r in rows}
        rows = [walked.get(r.model_type, r) for r in read_table()[1]]
    if update or not argv:
        write_table(rows)
        print(f"wrote {TABLE_MD.relative_to(ROOT)} and {TABLE_JSON.relative_to(ROOT)}: {counts(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
