"""mpqc.studies.family: a 2-size x 2-seed micro family on a small corpus trains in seconds, resumes
after a stop to the weights of an uninterrupted run, skips finished runs, and refuses a run made
with other settings; parameter counts by hand; matched tokens and the corpus cap; the budget."""

import dataclasses
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from mpqc.corpus import build_corpus
from mpqc.studies import family
from mpqc.studies.family import Preset, Size

CPU = torch.device("cpu")
WORDS = "the river city year people north government war first church house king music language".split()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A corpus from 30 generated Sphinx pages (the python-doc reader), about 36k characters."""
    root = tmp_path_factory.mktemp("family")
    html = root / "html"
    html.mkdir()
    rng = random.Random(0)
    for i in range(30):
        paragraphs = "".join("<p>" + " ".join(rng.choice(WORDS) for _ in range(40)) + ".</p>" for _ in range(5))
        (html / f"p{i:02d}.html").write_text(f'<div role="main"><h1>Page {i}</h1>{paragraphs}</div>')
    build_corpus(root / "corpus", ("python-doc",), paths={"python-doc": html})
    return root / "corpus"


MICRO = Preset(
    sizes=(Size("a", 16, 1, 2), Size("b", 16, 2, 2, batch=3)),
    vocab=300,
    batch=2,
    seq_len=16,
    lr=3e-3,
    lr_width=64,
    tokens_per_param=0.05,  # a: 3,376 non-embedding parameters -> 169 tokens -> 5 steps of 2 x 16
    seeds=(0, 1),
    corpus=True,
    checkpoint_every=2,
)


def run(out, corpus_dir, preset=MICRO, **stop):
    return {
        plan.name: status
        for plan, status in family.train_family(
            out, preset, seeds=preset.seeds, seeded=True, device=CPU, corpus_dir=corpus_dir, **stop
        )
    }


def weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


def test_micro_family_resumes_to_the_same_weights_and_skips_finished_runs(tmp_path, corpus_dir):
    names = ["a-seed0", "a-seed1", "b-seed0", "b-seed1"]
    assert run(tmp_path / "whole", corpus_dir) == dict.fromkeys(names, "trained")

    # Interrupted after 3 steps (a checkpoint at step 2, and one when it stopped), then continued.
    assert run(tmp_path / "parts", corpus_dir, stop_at=3) == dict.fromkeys(names, "stopped")
    for name in names:
        assert (tmp_path / "parts" / name / family.CHECKPOINT).is_file()
        assert not (tmp_path / "parts" / name / family.MARKER).exists()
    assert run(tmp_path / "parts", corpus_dir) == dict.fromkeys(names, "trained")

    runs = json.loads((tmp_path / "whole" / "family.json").read_text())["runs"]
    assert [(r["name"], r["train_seed"], r["steps"]) for r in runs] == [
        ("a-seed0", 0, 5),
        ("a-seed1", 1, 5),
        ("b-seed0", 0, 7),  # b: 6,736 non-embedding x 0.05 = 337 tokens -> 7 steps of 3 x 16
        ("b-seed1", 1, 7),
    ]
    for name in names:
        whole, parts = tmp_path / "whole" / name, tmp_path / "parts" / name
        a, b = weights(whole), weights(parts)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        log_whole, log_parts = (json.loads((d / family.MARKER).read_text()) for d in (whole, parts))
        assert log_whole["resumed_at"] == [] and log_parts["resumed_at"] == [3]
        assert log_whole["final_train_loss"] == log_parts["final_train_loss"]
        assert log_whole["holdout_perplexity"] == log_parts["holdout_perplexity"]
        assert not (parts / family.CHECKPOINT).exists()  # removed once the run is finished
    assert weights(tmp_path / "whole" / "a-seed0").keys()  # loadable
    assert not all(
        torch.equal(x, y)
        for x, y in zip(
            weights(tmp_path / "whole" / "a-seed0").values(), weights(tmp_path / "whole" / "a-seed1").values()
        )
    )  # two training seeds, two models

    stamp = (tmp_path / "whole" / "a-seed0" / "model.safetensors").stat().st_mtime_ns
    assert run(tmp_path / "whole", corpus_dir) == dict.fromkeys(names, "done")
    assert (tmp_path / "whole" / "a-seed0" / "model.safetensors").stat().st_mtime_ns == stamp

    with pytest.raises(ValueError, match=r"other settings \(lr: stored 0.003, asked 0.001\)"):
        run(tmp_path / "whole", corpus_dir, dataclasses.replace(MICRO, lr=1e-3))


def test_a_deadline_starts_no_run_and_an_old_log_is_refused(tmp_path, corpus_dir):
    import time

    preset = dataclasses.replace(MICRO, sizes=MICRO.sizes[:1])
    assert run(tmp_path, corpus_dir, preset, deadline=time.monotonic() - 1) == dict.fromkeys(
        ["a-seed0", "a-seed1"], "not started"
    )
    (tmp_path / "a-seed0").mkdir()
    (tmp_path / "a-seed0" / family.MARKER).write_text('{"params": 1}')  # a log of the older script
    with pytest.raises(ValueError, match="trained before runs recorded their settings"):
        run(tmp_path, corpus_dir, preset)


def test_the_run_log_records_what_a_sweep_needs(tmp_path, corpus_dir):
    import mpqc

    preset = dataclasses.replace(MICRO, sizes=MICRO.sizes[:1], seeds=(3,))
    assert run(tmp_path, corpus_dir, preset) == {"a-seed3": "trained"}
    log = json.loads((tmp_path / "a-seed3" / family.MARKER).read_text())
    assert log["train_seed"] == 3 and log["params"] == 8176 and log["non_embedding"] == 3376
    assert log["tokens"] == log["steps"] * 2 * 16 and log["text"]["used"] == ["python-doc"]
    model, tokenizer = mpqc.load_model(tmp_path / "a-seed3", cache=False)
    assert len(tokenizer) == 300 and torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_parameter_counts_by_hand():
    model = family.build_model(Size("a", 16, 1, 2), vocab_size=300, seq_len=16, seed=0, device="meta")
    # embedding 300 x 16 = 4,800 (the lm_head is tied to it); one layer: q, k, v, o 4 x 16 x 16 = 1,024,
    # gate, up, down 3 x 16 x 48 = 2,304, two norms 32; the final norm 16.
    assert family.parameter_counts(model) == {"total": 8176, "non_embedding": 3376}


def test_tokens_are_matched_per_parameter_and_capped_by_the_corpus():
    preset = dataclasses.replace(MICRO, tokens_per_param=20.0, max_epochs=2.0)
    plans = family.plan_runs(preset, vocab=300, train_tokens=50_000, seeds=(0,), seeded=True)
    a, b = plans  # the cap: 2 passes over 50,000 tokens
    assert a.tokens_matched == 20 * 3376 and not a.capped and a.steps == round(20 * 3376 / 32)
    assert b.tokens_matched == 20 * 6736 and b.capped and b.steps == round(100_000 / (3 * 16))
    assert (a.init_seed, a.data_seed, b.init_seed, b.data_seed) == (0, 1000, 1, 1001)
    again = family.plan_runs(preset, vocab=300, train_tokens=50_000, seeds=(2,), seeded=True)
    assert (again[0].init_seed, again[0].data_seed) == (20_000, 21_000)


def test_the_cpu_family_preset_spans_two_decades_with_three_seeds():
    preset = family.PRESETS["cpu-family"]
    plans = family.plan_runs(preset, vocab=preset.vocab, train_tokens=2_400_000, seeds=preset.seeds, seeded=True)
    sizes = sorted({p.non_embedding for p in plans})
    assert len(sizes) >= 6 and sizes[-1] / sizes[0] >= 100 and len(preset.seeds) >= 3
    # every size gets its 20 tokens per parameter from a corpus of this machine's 2.4M tokens
    assert not any(p.capped for p in plans)
    assert all(abs(p.tokens / p.non_embedding - 20) < 0.5 for p in plans)


def test_budget_rows_come_from_timed_steps(monkeypatch):
    plans = family.plan_runs(MICRO, vocab=300, train_tokens=10_000, seeds=(0, 1), seeded=True)
    monkeypatch.setattr(family, "measure_step_seconds", lambda size, *a, **k: {"a": 0.5, "b": 2.0}[size.name])
    rows = family.estimate_budget(plans, MICRO, 300, CPU, steps=1)
    assert [(r["size"], r["hours"]) for r in rows] == [
        ("a", 0.5 * plans[0].steps * 2 / 3600),
        ("b", 2.0 * plans[2].steps * 2 / 3600),
    ]
    assert family.measure_step_seconds(MICRO.sizes[0], MICRO, 300, 2, CPU, steps=1, warmup=1) > 0


def test_the_example_sweep_config_lists_every_cpu_family_run():
    from pathlib import Path

    from mpqc.studies import sweep

    preset = family.PRESETS["cpu-family"]
    config = sweep.load_config(str(Path(__file__).parent.parent / "examples" / "sweep_cpu_family.toml"))
    plans = family.plan_runs(preset, vocab=preset.vocab, train_tokens=2_400_000, seeds=preset.seeds, seeded=True)
    assert sorted((m.name, m.train_seed) for m in config.models) == sorted((p.name, p.train_seed) for p in plans)
    assert config.search["keep_high"] == ["lm_head"] and config.text.endswith("cpu-family/corpus/heldout")
