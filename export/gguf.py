"""GGUF export for llama.cpp: every matmul weight in its plan's type, the rest as the source has it.

    result = mpqc.export.to_gguf(qmodel, "model.gguf", source="SmolLM2.Q4_1.gguf")
    mpqc.export.llama_quantize_args(qmodel)    # the same choice as llama-quantize --tensor-type

With ``source`` (the GGUF the model was loaded from), its metadata, tokenizer and every tensor
that is not a quantized matmul weight are copied as they are; without one, a Llama-family
Hugging Face model is written from its config and weights (``tokenizer`` gives the vocabulary),
and other architectures are refused. Weights are encoded from the same float weights the
compiled model quantizes, by mpqc's own encoders (bit for bit ggml's reference quantizers, and
mpqc's MX formats in their exact GGUF containers), so the file dequantizes to exactly what the
compiled model computes with (``verify`` checks it before the file is moved into place). The
plan, Q_r and the average bits are stored under ``mpqc.*`` keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from mpqc.formats import Format, get_format
from mpqc.formats.ggml import decode, to_bytes
from mpqc.formats.packing import GGUF_STORABLE, gguf_type_name, to_ggml_blocks
from mpqc.graph import weight_tensor
from mpqc.io import atomic_file

from .markers import UnsupportedExport

FLOAT_TYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
_LAYER_TENSORS = {  # Hugging Face Llama module path -> GGUF tensor (llama.cpp's LLM_TENSOR names)
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GLOBAL_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LLAMA_FAMILY = ("LlamaForCausalLM",)


@dataclasses.dataclass(frozen=True)
class GGUFExportResult:
    path: str
    tensor_types: dict  # GGUF tensor name -> GGML type name, for every tensor written
    bytes: int


def gguf_tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name for a Hugging Face Llama parameter ('model.layers.3.mlp.up_proj.weight'
    -> 'blk.3.ffn_up.weight'), or None for one llama.cpp has no tensor for."""
    stem, _, kind = hf_name.rpartition(".")
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"blk.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{kind}"
    return f"{_GLOBAL_TENSORS[stem]}.{kind}" if stem in _GLOBAL_TENSORS else None


def ggml_type_of(fmt: Format) -> str:
    """The GGML type a weight format is stored as, or UnsupportedExport naming the ones that are."""
    if fmt.family == "cast":
        return FLOAT_TYPES[fmt.name]
    name = gguf_type_name(fmt)
    if name is None:
        raise UnsupportedExport(
            f"format {fmt.name!r} has no exact GGUF type (llama.cpp could not run what mpqc computes); "
            f"GGUF stores {', '.join([*GGUF_STORABLE, *FLOAT_TYPES])}"
        )
    return name


def rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's q/k rows in llama.cpp's (GGUF) order: convert_hf_to_gguf's permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads(config, gguf_name: str) -> int | None:
    if ".attn_q." in gguf_name:
        return config.num_attention_heads
    if ".attn_k." in gguf_name:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


@dataclasses.dataclass
class _Tensor:
    """One tensor to write: GGUF name, GGML type, numpy data (bytes for quantized types), and
    the float32 values llama.cpp will read back (what the compiled model computes with)."""

    name: str
    type_name: str
    data: np.ndarray
    expected: torch.Tensor | None = None


def encode_tensor(name: str, weight: torch.Tensor, fmt: Format) -> _Tensor:
    """``weight`` (out, in; already in GGUF row order) in ``fmt``'s GGML type."""
    type_name = ggml_type_of(fmt)
    w = weight.detach().to("cpu", torch.float32)
    if fmt.family == "cast":
        dtype = {"F32": np.float32, "F16": np.float16}.get(type_name)
        if dtype is not None:
            data = w.numpy().astype(dtype)
            return _Tensor(name, type_name, data, torch.from_numpy(data.astype(np.float32)))
        bits = w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(w.shape[0], -1)
        return _Tensor(name, type_name, bits, w.to(torch.bfloat16).to(torch.float32))
    if w.shape[-1] % fmt.block_size:
        raise UnsupportedExport(
            f"tensor {name}: rows of {w.shape[-1]} are not whole {type_name} blocks of {fmt.block_size}; "
            "llama.cpp cannot store it in that type"
        )
    try:
        blocks = to_ggml_blocks(w, fmt)
    except ValueError as e:
        raise UnsupportedExport(f"tensor {name}: {e}") from None
    data = to_bytes(blocks).numpy().reshape(w.shape[0], -1)
    expected = None if type_name == "MXFP4" else decode(blocks).reshape(w.shape)
    return _Tensor(name, type_name, data, expected)


def plan_tensors(qmodel) -> dict[str, tuple[torch.Tensor, Format, str]]:
    """GGUF name -> (float weight in GGUF row order, format, matmul) for every plan weight."""
    graph, plan = qmodel.graph, qmodel.plan
    config = graph.config
    out = {}
    for m in graph.matmuls:
        if not m.has_weight:
            continue
        name = "output.weight" if m.role == "lm_head" else gguf_tensor_name(m.weight)
        if name is None:
            raise UnsupportedExport(f"matmul {m.name}: weight {m.weight} has no llama.cpp tensor name (Llama only)")
        if m.weight_reduction_axis != 1 or len(m.weight_shape) != 2:
            raise UnsupportedExport(
                f"matmul {m.name}: GGUF stores (out, in) weights; {m.weight} reduces axis {m.weight_reduction_axis}"
            )
        w = weight_tensor(qmodel.module, m.weight).detach()
        heads = _heads(config, name) if config is not None else None
        if heads:
            w = rope_permute(w, heads)
        out[name] = (w, plan.weight_format(m), m.name)
    return out


def _check_expected(qmodel, tensors: list[_Tensor], matmul_of: dict[str, str]) -> None:
    """The decoded file equals the compiled model's quantized weights, bit for bit."""
    config = qmodel.graph.config
    for t in tensors:
        if t.name not in matmul_of or t.expected is None:
            continue
        m = qmodel.graph.matmul(matmul_of[t.name])
        wq = (
            qmodel.weight_cache.get(
                m.weight,
                weight_tensor(qmodel.module, m.weight),
                qmodel.plan.weight_format(m),
                m.weight_reduction_axis,
                qmodel.plan.rounding,
            )
            .detach()
            .to("cpu", torch.float32)
        )
        heads = _heads(config, t.name)
        if heads:
            wq = rope_permute(wq, heads)
        if not torch.equal(wq, t.expected):
            raise RuntimeError(
                f"tensor {t.name}: the GGUF encoding decodes to other values than the compiled model uses"
            )


def plan_metadata(qmodel) -> dict[str, str | float]:
    plan = qmodel.plan
    return {
        "mpqc.plan": plan.to_json(),
        "mpqc.quantization_ratio": float(plan.quantization_ratio("params")),
        "mpqc.quantization_ratio_macs": float(plan.quantization_ratio("macs")),
        "mpqc.q_r_definition": plan.q_r_definition,
        "mpqc.average_bits": float(plan.average_bits()),
    }


def to_gguf(qmodel, path, *, source=None, tokenizer=None, verify: bool = True) -> GGUFExportResult:
    """Write ``qmodel`` (``mpqc.compile``) with its current plan as a GGUF file llama.cpp runs.

    ``source``: the GGUF file the model was loaded from (metadata, tokenizer and the tensors the
    plan does not quantize are copied from it); without it the model must be a Llama-family
    Hugging Face model and ``tokenizer`` its tokenizer (a byte-level BPE one, as Llama 3,
    SmolLM and GPT-2 use). A tied lm_head gets its own ``output.weight`` unless its plan type
    reproduces the source's ``token_embd`` exactly. Atomic: nothing is left at ``path`` on error."""
    import gguf  # the demo/llamacpp extras

    if source is None:
        _check_hf_exportable(qmodel.graph, tokenizer)
    planned = plan_tensors(qmodel)
    if source is not None:
        reader = gguf.GGUFReader(str(source))
        arch = str(reader.fields["general.architecture"].contents())
        tensors, metadata = _from_source(reader, planned)
    else:
        arch = "llama"
        tensors, metadata = _from_hf(qmodel, planned, tokenizer)
    matmul_of = {name: mm for name, (_, _, mm) in planned.items()}
    if verify:
        _check_expected(qmodel, tensors, matmul_of)
    metadata = [*metadata, *((k, v, None) for k, v in plan_metadata(qmodel).items())]
    _write(path, arch, metadata, tensors)
    return GGUFExportResult(str(path), {t.name: t.type_name for t in tensors}, Path(path).stat().st_size)


def _write(path, arch: str, metadata, tensors: list[_Tensor]) -> None:
    import gguf

    with atomic_file(path, "wb") as f:
        writer = gguf.GGUFWriter(None, arch)
        for key, value, vtype in metadata:
            if vtype is None:
                writer.add_key_value(key, value, _value_type(value))
            else:
                writer.add_key_value(key, value, vtype[0], sub_type=vtype[1])
        for t in tensors:
            qtype = gguf.GGMLQuantizationType[t.type_name]
            if t.type_name in ("F32", "F16"):
                writer.add_tensor(t.name, t.data)
            else:
                writer.add_tensor(t.name, t.data, raw_dtype=qtype)  # bytes (rows, row bytes)
        writer.fout = [f]  # into the temporary file that atomic_file moves into place
        writer.state = gguf.gguf_writer.WriterState.EMPTY
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        f.flush()


def _value_type(value):
    import gguf

    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, int):
        return gguf.GGUFValueType.UINT32 if value >= 0 else gguf.GGUFValueType.INT32
    return gguf.GGUFValueType.FLOAT32


def _source_field(field):
    import gguf

    main = field.types[0]
    sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
    return field.name, field.contents(), (main, sub)


def _from_source(reader, planned):
    """Tensors and metadata of a source GGUF with the plan's weights re-encoded."""
    import gguf

    metadata = [
        _source_field(f)
        for f in reader.fields.values()
        if f.name != "general.architecture" and not f.name.startswith("GGUF.") and not f.name.startswith("mpqc.")
    ]
    tensors, names = [], set()
    for t in reader.tensors:
        names.add(t.name)
        if t.name in planned:
            w, fmt, _ = planned[t.name]
            tensors.append(encode_tensor(t.name, w, fmt))
        else:
            type_name = gguf.GGMLQuantizationType(t.tensor_type).name
            tensors.append(_Tensor(t.name, type_name, np.asarray(t.data)))
    if "output.weight" in planned and "output.weight" not in names:
        tensors.append(_tied_output(reader, planned["output.weight"], tensors))
    return [x for x in tensors if x is not None], metadata


def _tied_output(reader, planned_output, tensors):
    """A tied lm_head: nothing when its plan type re-encodes token_embd to the same bytes."""
    w, fmt, _ = planned_output
    out = encode_tensor("output.weight", w, fmt)
    embd = next(t for t in tensors if t.name == "token_embd.weight")
    if embd.type_name == out.type_name and np.array_equal(np.asarray(embd.data).reshape(-1), out.data.reshape(-1)):
        return None
    return out


def _check_hf_exportable(graph, tokenizer) -> None:
    if graph.model_class not in LLAMA_FAMILY or graph.config is None:
        raise UnsupportedExport(
            f"GGUF export without a source GGUF supports {', '.join(LLAMA_FAMILY)}; {graph.model_class} needs "
            "source= (the GGUF it was loaded from), or convert it with llama.cpp's convert_hf_to_gguf.py first"
        )
    if tokenizer is None:
        raise UnsupportedExport("GGUF export from a Hugging Face model needs its tokenizer (tokenizer=...)")


def _from_hf(qmodel, planned, tokenizer):
    """Tensors and metadata of a Llama-family Hugging Face model, from its config."""
    config = qmodel.graph.config
    tensors = []
    for name, p in qmodel.module.state_dict().items():
        gname = gguf_tensor_name(name)
        if gname is None or gname in planned:
            continue
        tensors.append(encode_tensor(gname, p, get_format("fp32")))
    tied = "output.weight" in planned and not any(t.name == "token_embd.weight" for t in tensors)
    if tied:  # the graph registered the shared weight under lm_head only
        w = planned["output.weight"][0]
        tensors.append(encode_tensor("token_embd.weight", w, get_format("fp32")))
    tensors += [encode_tensor(n, w, fmt) for n, (w, fmt, _) in planned.items()]
    return tensors, llama_metadata(config) + tokenizer_metadata(tokenizer, config)


def llama_metadata(config) -> list:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    values = {
        "general.name": getattr(config, "_name_or_path", "") or "mpqc-export",
        "llama.vocab_size": config.vocab_size,
        "llama.context_length": config.max_position_embeddings,
        "llama.embedding_length": config.hidden_size,
        "llama.block_count": config.num_hidden_layers,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.rope.dimension_count": head_dim,
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": getattr(config, "num_key_value_heads", None) or heads,
        "llama.attention.key_length": head_dim,
        "llama.attention.value_length": head_dim,
        "llama.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "llama.rope.freq_base": float(_rope_theta(config)),
    }
    return [(k, v, None) for k, v in values.items()]


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") not in ("default", None):
        raise UnsupportedExport(f"RoPE scaling {params.get('rope_type')!r} is not written here; use a source GGUF")
    return params.get("rope_theta", getattr(config, "rope_theta", 10000.0))


def tokenizer_metadata(tokenizer, config) -> list:
    """A byte-level BPE tokenizer as llama.cpp's "gpt2" vocabulary: tokens, types, merges, specials."""
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else None
    model = (state or {}).get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedExport("GGUF export from a Hugging Face model writes byte-level BPE tokenizers only")
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in state.get("added_tokens", [])}}
    tokens = [f"[PAD{i}]" for i in range(config.vocab_size)]
    types = [gguf.TokenType.UNUSED] * config.vocab_size
    special = {t["content"] for t in state.get("added_tokens", []) if t.get("special")}
    for text, i in vocab.items():
        if i < config.vocab_size:
            tokens[i] = text
            types[i] = gguf.TokenType.CONTROL if text in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    arr = gguf.GGUFValueType.ARRAY
    out = [
        ("tokenizer.ggml.model", "gpt2", None),
        ("tokenizer.ggml.pre", "default", None),
        ("tokenizer.ggml.tokens", tokens, (arr, gguf.GGUFValueType.STRING)),
        ("tokenizer.ggml.token_type", [int(t) for t in types], (arr, gguf.GGUFValueType.INT32)),
        ("tokenizer.ggml.merges", merges, (arr, gguf.GGUFValueType.STRING)),
    ]
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id")):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            out.append((f"tokenizer.ggml.{key}_token_id", int(value), None))
    return out


def llama_quantize_args(qmodel, *, source_types: dict | None = None) -> list[str]:
    """``--tensor-type NAME=TYPE`` arguments that make llama-quantize choose the plan's types, for
    a user who runs it on their own f16/f32 GGUF of the same model. Refuses plans with formats
    llama-quantize does not make (MX integer containers, mpqc-only formats)."""
    args = []
    for name, (_, fmt, _) in plan_tensors(qmodel).items():
        if fmt.family == "cast":
            type_name = FLOAT_TYPES[fmt.name]
        elif fmt.family == "ggml" or fmt.name == "mxfp4":
            type_name = ggml_type_of(fmt)
        else:
            raise UnsupportedExport(
                f"tensor {name}: format {fmt.name!r} is stored in GGUF as {ggml_type_of(fmt)} blocks of mpqc's own "
                "codes, which llama-quantize's quantizer does not produce; use mpqc export --gguf instead"
            )
        args.append(f"--tensor-type={re.escape(name.removesuffix('.weight'))}={type_name.lower()}")
    return args


def gguf_tensor_types(path: str | os.PathLike) -> dict[str, str]:
    """GGUF tensor name -> GGML type name of a file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors}


# ---- llama-quantize's own recipes, as mpqc plans ------------------------------------------------------

_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}  # llama-quant.cpp tensor_type_fallback


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _fallback(name: str, ncols: int) -> str:
    if ncols % get_format(name).block_size:
        name = _FALLBACK[name]
        if ncols % get_format(name).block_size:
            return "fp16"
    return name


def q4_k_m_type(role: str, layer: int | None, n_layers: int, ncols: int) -> str:
    """The type llama-quantize's Q4_K_M gives a Llama weight (llama_tensor_get_type, no imatrix),
    shape fallbacks included: 'q4_k' on rows that are not whole 256-blocks becomes 'q5_0'."""
    if role == "lm_head":  # output.weight, or token_embd when tied
        return "q8_0" if ncols % 256 else "q6_k"
    wanted = "q4_k"
    if role in ("v_proj", "down_proj") and _use_more_bits(layer, n_layers):
        wanted = "q6_k"
    return _fallback(wanted, ncols)


def q4_k_m_plan(graph):
    """llama.cpp's Q4_K_M recipe for ``graph`` (a Llama-family model) as a plan scored with
    llama.cpp's activations: what ``llama-quantize model-f32.gguf out.gguf Q4_K_M`` chooses."""
    from mpqc.plan import Plan

    n_layers = graph.num_layers
    assignments = {}
    for m in graph.matmuls:
        if m.has_weight:
            fmt = q4_k_m_type(m.role, m.layer, n_layers, m.weight_shape[1])
            assignments[m.component("matmul")] = fmt
    return Plan(graph, assignments, default="fp32", activations=False, high="fp32", target="llama.cpp")
