"""GGUF export for llama.cpp: the file decodes to what the compiled model computes with, and
llama.cpp (xllamacpp) runs it with the perplexity mpqc's llama.cpp emulation predicts."""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest
import torch

import mpqc
from mpqc.export import LlamaCppLM, UnsupportedExport, llama_quantize_args, to_gguf
from mpqc.export.gguf import gguf_tensor_name, q4_k_m_plan, q4_k_m_type, rope_permute
from mpqc.graph import weight_tensor

gguf = pytest.importorskip("gguf")
TEXT = "/usr/share/common-licenses/GPL-3"  # base-files: on every Debian machine

# A plan touching every GGUF type mpqc writes, on a tiny Llama whose rows are whole k-quant blocks.
MIXED = {
    "layers.0.self_attn.q_proj": "q4_0",
    "layers.0.self_attn.k_proj": "q5_0",
    "layers.0.self_attn.v_proj": "q8_0",
    "layers.0.self_attn.o_proj": "mxint4",
    "layers.0.mlp.gate_proj": "q4_1",
    "layers.0.mlp.up_proj": "mxfp4",
    "layers.0.mlp.down_proj": "q4_k",
    "layers.1.self_attn.q_proj": "q5_1",
    "layers.1.self_attn.k_proj": "mxint8",
    "layers.1.self_attn.v_proj": "q6_k",
    "layers.1.self_attn.o_proj": "bf16",
    "layers.1.mlp.gate_proj": "q5_k",
    "layers.1.mlp.up_proj": "fp16",
    "lm_head": "q8_0",
}


@functools.cache
def tiny_llama():
    """(model, tokenizer, token ids): a random Llama (hidden 256, 2 layers, GQA) with a byte-level
    BPE tokenizer trained on a license text, so that llama.cpp gets a real vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    text = open(TEXT).read()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    # initializer_range 0.3: weights large enough that quantization moves perplexity by several
    # percent, so a 0.5% agreement with llama.cpp says something
    config = AutoConfig.for_model(
        "llama",
        vocab_size=tok.get_vocab_size(),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.tensor(tokenizer(text)["input_ids"])
    return model, tokenizer, ids


@functools.cache
def tiny_graph():
    model, _, ids = tiny_llama()
    return mpqc.capture(model, (ids[None, :8],))


def test_tensor_names_and_rope_permutation():
    assert gguf_tensor_name("model.layers.3.mlp.up_proj.weight") == "blk.3.ffn_up.weight"
    assert gguf_tensor_name("model.layers.0.self_attn.o_proj.weight") == "blk.0.attn_output.weight"
    assert gguf_tensor_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_tensor_name("model.rotary_emb.inv_freq") is None
    w = torch.arange(8 * 3).reshape(8, 3)
    # two heads of 4 rows: rows (0 1 2 3) become (0 2 1 3), as convert_hf_to_gguf.py permutes them
    assert rope_permute(w, 2)[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]


def test_round_trip_every_tensor_decodes_to_the_compiled_model(tmp_path):
    """gguf's reader dequantizes every matmul weight to exactly the compiled model's weight."""
    _, tokenizer, _ = tiny_llama()
    graph = tiny_graph()
    plan = mpqc.Plan(graph, MIXED, default="fp32", activations=False, high="fp32", target="llama.cpp")
    qmodel = mpqc.compile(graph, plan)
    result = to_gguf(qmodel, tmp_path / "tiny.gguf", tokenizer=tokenizer)
    reader = gguf.GGUFReader(str(tmp_path / "tiny.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    heads = {"attn_q": 4, "attn_k": 2}
    for m in graph.matmuls:
        if not m.has_weight:
            continue
        name = "output.weight" if m.role == "lm_head" else gguf_tensor_name(m.weight)
        t = tensors[name]
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(m.weight_shape)
        weight = weight_tensor(qmodel.module, m.weight)
        want = qmodel.weight_cache.get(m.weight, weight, plan.weight_format(m), 1, "nearest").detach()
        kind = name.split(".")[-2]
        if kind in heads:
            want = rope_permute(want, heads[kind])
        assert np.array_equal(values, want.numpy()), name
    expected_types = {"q4_0": "Q4_0", "mxint4": "Q4_0", "mxint8": "Q8_0", "mxfp4": "MXFP4", "q6_k": "Q6_K"}
    assert result.tensor_types["blk.0.attn_output.weight"] == expected_types["mxint4"]
    assert result.tensor_types["blk.0.ffn_up.weight"] == "MXFP4"
    assert result.tensor_types["blk.1.attn_output.weight"] == "BF16"
    assert result.tensor_types["blk.0.attn_norm.weight"] == "F32"
    stored = json.loads(reader.fields["mpqc.plan"].contents())
    assert stored["components"]["layers.0.mlp.down_proj"]["weight"] == "q4_k" and stored["target"] == "llama.cpp"
    assert float(reader.fields["mpqc.average_bits"].contents()) == pytest.approx(plan.average_bits())
    assert reader.fields["mpqc.q_r_definition"].contents() == plan.q_r_definition == "params of all matmuls"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"


def test_llamacpp_perplexity_matches_the_emulation(tmp_path):
    """llama.cpp runs the exported mixed plan with mpqc's predicted perplexity (within 0.5%).

    The plan moves perplexity by several percent from the float model, so the agreement is not
    that of two near-float models; and without llama.cpp's activation setting the emulation is
    further off (it was -1.8% when measured), which the target setting closes."""
    pytest.importorskip("xllamacpp")
    _, tokenizer, ids = tiny_llama()
    graph = tiny_graph()
    windows = mpqc.evaluate.sample_windows(ids, 128, 12, seed=0)
    plan = mpqc.Plan(graph, MIXED, default="fp32", activations=False, high="fp32", target="llama.cpp")
    qmodel = mpqc.compile(graph, plan)
    to_gguf(qmodel, tmp_path / "tiny.gguf", tokenizer=tokenizer)
    emulated = mpqc.evaluate.perplexity(qmodel, windows=windows, progress=False)
    measured = LlamaCppLM(tmp_path / "tiny.gguf", threads=2).perplexity(windows=windows)
    qmodel.set_plan(mpqc.Plan.uniform(graph, "fp32"))
    float_ppl = mpqc.evaluate.perplexity(qmodel, windows=windows, progress=False)
    assert abs(emulated / float_ppl - 1) > 0.02  # the plan is far from the float model
    assert abs(measured / emulated - 1) < 0.005, (measured, emulated, float_ppl)


def test_refusals_name_the_problem(tmp_path):
    _, tokenizer, _ = tiny_llama()
    graph = tiny_graph()
    qmodel = mpqc.compile(graph, mpqc.Plan.uniform(graph, "mxfp8_e4m3"))
    with pytest.raises(UnsupportedExport, match="no exact GGUF type"):
        to_gguf(qmodel, tmp_path / "x.gguf", tokenizer=tokenizer)
    assert not os.listdir(tmp_path)  # nothing half-written
    qmodel.set_plan(mpqc.Plan.uniform(graph, "q4_0"))
    with pytest.raises(UnsupportedExport, match="tokenizer"):
        to_gguf(qmodel, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="no GGUF type"):
        mpqc.Plan.uniform(graph, "nvfp4", target="llama.cpp")
    from tiny_models import captured

    _, gpt2 = captured("gpt2")
    with pytest.raises(UnsupportedExport, match="LlamaForCausalLM"):
        to_gguf(mpqc.compile(gpt2, mpqc.Plan.uniform(gpt2, "q8_0")), tmp_path / "y.gguf", tokenizer=tokenizer)


def test_llama_quantize_args_and_q4_k_m_recipe():
    graph = tiny_graph()
    plan = mpqc.Plan(graph, {"layers.0.mlp.down_proj": "q4_k"}, default="q8_0")
    args = llama_quantize_args(mpqc.compile(graph, plan))
    assert "--tensor-type=blk\\.0\\.ffn_down=q4_k" in args and "--tensor-type=output=q8_0" in args
    with pytest.raises(UnsupportedExport, match="llama-quantize"):
        llama_quantize_args(mpqc.compile(graph, mpqc.Plan.uniform(graph, "mxint4")))
    # Q4_K_M on SmolLM2's shapes: 576-wide rows cannot hold 256-blocks, so q4_k falls back to q5_0
    # and q6_k to q8_0; the tied output is q8_0; ffn_down (1536 wide) keeps q4_k / q6_k.
    assert q4_k_m_type("q_proj", 5, 30, 576) == "q5_0"
    # use_more_bits(i, 30): i < 3, i >= 26, or (i - 3) % 3 == 2
    assert q4_k_m_type("v_proj", 0, 30, 576) == "q8_0" and q4_k_m_type("v_proj", 4, 30, 576) == "q5_0"
    assert q4_k_m_type("down_proj", 4, 30, 1536) == "q4_k" and q4_k_m_type("down_proj", 5, 30, 1536) == "q6_k"
    assert q4_k_m_type("lm_head", None, 30, 576) == "q8_0" and q4_k_m_type("lm_head", None, 30, 2048) == "q6_k"
    recipe = q4_k_m_plan(graph)  # 256-wide: every tensor keeps its k-quant
    assert {recipe.weight_format(m).name for m in graph.matmuls if m.has_weight} <= {"q4_k", "q6_k"}


@pytest.mark.slow
def test_smollm2_from_its_gguf_runs_in_llamacpp_with_the_emulated_perplexity(tmp_path):
    pytest.importorskip("xllamacpp")
    from mpqc.data import load_tokens, split_tokens, text_prefix
    from mpqc.models import smollm2_gguf_path

    model, tokenizer = mpqc.load_model()
    graph = mpqc.capture(model, (torch.zeros(2, 64, dtype=torch.long),))
    plan = q4_k_m_plan(graph)
    qmodel = mpqc.compile(graph, plan)
    result = to_gguf(qmodel, tmp_path / "smollm2.gguf", source=smollm2_gguf_path())
    assert (
        result.tensor_types["blk.0.ffn_down.weight"] == "Q6_K" and result.tensor_types["blk.0.attn_q.weight"] == "Q5_0"
    )
    assert "output.weight" not in result.tensor_types  # the tied Q8_0 lm_head shares token_embd's bytes
    _, holdout = split_tokens(load_tokens(tokenizer))
    windows = mpqc.evaluate.sample_windows(holdout, 512, 4, 0, text_prefix(tokenizer))
    emulated = mpqc.evaluate.perplexity(qmodel, windows=windows, batch_size=1, progress=False)
    measured = LlamaCppLM(tmp_path / "smollm2.gguf", threads=2).perplexity(windows=windows)
    # 2044 predicted tokens: on 510 (2 x 256) llama.cpp's own rounding left -0.85%, more than the
    # issue's 0.5%; benchmarks/gguf_llamacpp.py measures -0.28% on 4 x 512.
    assert abs(measured / emulated - 1) < 0.005, (measured, emulated)


def test_command_line_takes_gguf_and_target():
    from mpqc.cli import build_parser

    args = build_parser().parse_args(["export", "--gguf", "out.gguf", "--llama-quantize-args", "--format", "q4_0"])
    assert args.gguf == "out.gguf" and args.llama_quantize_args
    args = build_parser().parse_args(["search", "--target", "llama.cpp", "--low", "q4_0", "--high", "q8_0"])
    assert args.target == "llama.cpp"
