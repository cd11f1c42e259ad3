"""mpqc.studies.bitlevel (mpqc bitsweep): uniform weight-only k-bit plans on tiny saved models,
total bits by hand count, resuming, and the bit-optimal k on a hand-made front."""

from __future__ import annotations

import json

import pytest
from test_sweep import WORDS, save_tiny_llama, write_text

from mpqc.cli import main
from mpqc.studies import bitlevel

VOCAB = 1 + len(WORDS)  # save_tiny_llama's word-level vocabulary: <unk> and the words
CONFIG = """
out = "bits.csv"
text = "text.txt"
models = [{ path = "tiny-a", name = "a" }, { path = "tiny-b", name = "b" }]

[grid]
formats = ["int3", "int4", "int8", "fp4_e2m1"]
block_size = [32, 64]

[eval]
seq_len = 16
n_samples = 4
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = tmp_path_factory.mktemp("bitlevel")
    # reduction axes of 64 and 128 elements: every block size of the grid divides them
    save_tiny_llama(d / "tiny-a", hidden=64, layers=1)
    save_tiny_llama(d / "tiny-b", hidden=128, layers=2)
    write_text(d / "text.txt")
    (d / "bits.toml").write_text(CONFIG)
    return d


def matmul_bits(hidden: int, layers: int, bits_per_weight: float) -> float:
    """Hand count: per layer q, k, v, o (hidden x hidden: 2 heads, 2 kv heads) and the MLP's gate,
    up, down (2 hidden x hidden each) in the low format; the lm_head (vocab x hidden) kept at 16."""
    return layers * 10 * hidden * hidden * bits_per_weight + VOCAB * hidden * 16


def test_bitsweep_measures_every_cell_with_total_bits_by_hand(study, capsys, monkeypatch):
    monkeypatch.setenv("MPQC_CACHE", str(study / "cache"))
    assert main(["bitsweep", str(study / "bits.toml"), "--quiet"]) == 0
    rows = bitlevel.read_results(str(study / "bits.csv"))
    assert len(rows) == 2 * (1 + 4 * 2)  # models x (all-high + formats x block sizes)
    by = {(r["model"], r["format"], r["block_size"] if r["format"] != "bf16" else None): r for r in rows}
    for model, hidden, layers in (("a", 64, 1), ("b", 128, 2)):
        norms = (2 * layers + 1) * hidden  # RMSNorm weights; the embedding is untied
        other = (VOCAB * hidden + norms) * 16
        # int4 at block 32: 4 bits + one fp32 scale per 32 = 5 bits per weight; at 64, 4.5
        for fmt, block, per_weight in (("int4", 32, 5), ("int4", 64, 4.5), ("int3", 64, 3.5), ("int8", 32, 9)):
            r = by[(model, fmt, block)]
            assert r["weight_bits"] == matmul_bits(hidden, layers, per_weight) and r["other_bits"] == other
            assert r["total_bits"] == r["weight_bits"] + other and r["bits"] == int(fmt[3:])
        base = by[(model, "bf16", None)]
        assert base["bits"] == 16 and base["total_bits"] == matmul_bits(hidden, layers, 16) + other
        assert base["ppl"] == base["ppl_base"] and base["delta_ppl"] == 0
        # 3-bit codes move the random model further from its all-high perplexity than 8-bit ones
        assert abs(by[(model, "int8", 32)]["delta_ppl"]) < abs(by[(model, "int3", 32)]["delta_ppl"])
    assert {r["q_r_definition"] for r in rows} == {"params of matmuls excluding kept-high: lm_head"}
    out = capsys.readouterr().out
    assert "is 4 bits bit-optimal here?" in out and "| total-bits budget |" in out
    verdict = json.loads((study / "bits_bit_optimal.json").read_text())
    assert verdict["models"] == ["a", "b"] and len(verdict["budgets"]) == bitlevel.N_BUDGETS
    png = (study / "bits_bits.png").read_bytes()  # perplexity against total bits, the front drawn
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # Run again: every cell is finished, no model loads.
    monkeypatch.setattr("mpqc.load_model", lambda *a, **k: pytest.fail("a finished study loaded a model"))
    assert main(["bitsweep", str(study / "bits.toml"), "--quiet"]) == 0
    assert "ran 0 cells, skipped 18" in capsys.readouterr().out
    assert bitlevel.read_results(str(study / "bits.csv")) == rows


def point(model, params, bits, ppl, block=64):
    fmt = f"int{bits}" if bits < 16 else "bf16"
    return {
        "model": model,
        "params": params,
        "format": fmt,
        "bits": bits,
        "block_size": block,
        "total_bits": params * bits,
        "bits_per_param": float(bits),
        "ppl": ppl,
    }


def test_bit_optimal_names_the_k_of_each_budget():
    rows = [
        point("A", 1000, 4, 20.0), point("A", 1000, 8, 20.5), point("A", 1000, 16, 19.4),
        point("B", 4000, 4, 12.0), point("B", 4000, 8, 12.5), point("B", 4000, 16, 11.7),
        point("C", 16000, 4, 8.0), point("C", 16000, 8, 7.9), point("C", 16000, 16, 7.85),
    ]  # fmt: skip
    result = bitlevel.bit_optimal(rows, n_budgets=5)
    # front: A4 (4000), B4 (16000; A16 ties its bits at a worse perplexity), C4, C8, C16
    assert [(p["model"], p["bits"]) for p in result["pareto"]] == [("A", 4), ("B", 4), ("C", 4), ("C", 8), ("C", 16)]
    # budgets 4000 * 64^(i/4): 4000, 11314, 32000, 90510, 256000
    assert [round(b["budget_bits"]) for b in result["budgets"]] == [4000, 11314, 32000, 90510, 256000]
    assert [(b["model"], b["bits"]) for b in result["budgets"]] == [("A", 4), ("A", 4), ("B", 4), ("C", 4), ("C", 16)]
    assert result["k_counts"] == {4: 4, 16: 1}
    assert result["verdict"] == "is 4 bits bit-optimal here? yes (k = 4: 4, k = 16: 1 of 5 total-bits budgets)"
    # without the 4-bit rows: budgets 8000 * 32^(i/4) go to A8, A16, B8, B16, C16
    no_fours = bitlevel.bit_optimal([p for p in rows if p["bits"] != 4], n_budgets=5)
    assert [(b["model"], b["bits"]) for b in no_fours["budgets"]] == [
        ("A", 8),
        ("A", 16),
        ("B", 8),
        ("B", 16),
        ("C", 16),
    ]
    assert no_fours["verdict"] == (
        "is 4 bits bit-optimal here? no: k = 16 is bit-optimal at most budgets "
        "(k = 8: 2, k = 16: 3 of 5 total-bits budgets)"
    )


def test_bit_level_config_errors_name_the_problem():
    base = {"out": "r.csv", "models": ["m"]}
    config = bitlevel.config_from_dict(base)
    assert config.formats == bitlevel.DEFAULT_FORMATS and config.block_sizes == (32, 64, 128, 256, 512)
    assert len(config.cells()) == 1 + len(bitlevel.DEFAULT_FORMATS) * 5
    with pytest.raises(ValueError, match="takes no block size"):
        bitlevel.config_from_dict({**base, "grid": {"formats": ["q4_0"]}})
    with pytest.raises(ValueError, match="unknown format 'int9'"):
        bitlevel.config_from_dict({**base, "grid": {"formats": ["int9"]}})
    with pytest.raises(ValueError, match="grid.block_size values are positive ints"):
        bitlevel.config_from_dict({**base, "grid": {"block_size": ["vector"]}})
    with pytest.raises(ValueError, match=r"unknown \[eval\] key\(s\) \['n_sample'\]"):
        bitlevel.config_from_dict({**base, "eval": {"n_sample": 3}})
