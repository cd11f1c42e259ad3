"""mpqc.studies.predict: the regression, the features on tiny models, a small real collection, the CLI."""

from __future__ import annotations

import functools
import json
import math
import random

import numpy as np
import pytest
import torch
from tiny_models import captured, example_ids, tiny_config

import mpqc
from mpqc.cli import main
from mpqc.search import Budget, SearchSpace
from mpqc.search.budget import search_precisions
from mpqc.studies import predict
from mpqc.studies.predict.features import fisher_gradients

TOKENS = torch.randint(0, 128, (8000,), generator=torch.Generator().manual_seed(0))


# ---- the regression on synthetic data -----------------------------------------------------------


def synthetic_rows(n: int, seed: int, coef=(-1.0, 0.8, 0.5), noise: float = 0.05):
    """ln(delta NLL) = coef[0] + coef[1] ln(fisher_diag) + coef[2] nll_base + N(0, noise^2)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        f = float(np.exp(rng.uniform(-8, -1)))
        base = float(rng.uniform(2, 5))
        dnll = math.exp(coef[0] + coef[1] * math.log(f) + coef[2] * base + rng.normal(0, noise))
        rows.append(
            {
                "model": f"m{i % 3}",
                "plan_id": i,
                "fisher_diag": f,
                "nll_base": base,
                "params": 1000,
                "ratio": float(rng.uniform(0.2, 1)),
                "delta_ppl": math.expm1(dnll),
            }
        )
    return rows


def test_fit_recovers_known_coefficients():
    rows = synthetic_rows(200, seed=0)
    p = predict.Predictor.fit(rows, ["log(fisher_diag)", "nll_base"])
    # With 200 points and noise 0.05 the standard errors are about 0.003-0.02; 4 of them is a
    # bound a correct fit breaks with probability ~1e-4, and the errors themselves must be small.
    for got, err, want in zip((p.intercept, *p.coef), (p.intercept_err, *p.coef_err), (-1.0, 0.8, 0.5)):
        assert abs(got - want) <= 4 * err and err < 0.05
    assert abs(p.residual_std - 0.05) < 0.01 and p.r2_log > 0.99 and p.n == 200 and p.dropped == 0
    # Predictions on new rows: relative error of delta NLL about the noise (5%).
    new = synthetic_rows(50, seed=1)
    pred_dnll = np.log1p(p.predict(new))
    true_dnll = np.log1p([r["delta_ppl"] for r in new])
    assert np.median(np.abs(pred_dnll / true_dnll - 1)) < 0.06


def test_constant_terms_are_left_out_and_rows_without_a_loss_rise_dropped():
    rows = synthetic_rows(40, seed=2)
    rows[0] = {**rows[0], "delta_ppl": -0.001}  # a plan that measured better than the baseline
    p = predict.Predictor.fit(rows, ["log(fisher_diag)", "log(params)"])
    assert p.unused == ("log(params)",) and p.coef[1] == 0.0 and math.isnan(p.coef_err[1])
    assert p.dropped == 1 and p.n == 39
    assert np.all(np.isfinite(p.predict(rows)))


def test_save_and_load_round_trip(tmp_path):
    rows = synthetic_rows(30, seed=3)
    p = predict.Predictor.fit(rows, ["log(fisher_diag)", "nll_base", "log(params)"], setup={"low": "mxint4"})
    path = tmp_path / "p.json"
    p.save(str(path))
    q = predict.Predictor.load(str(path))
    assert q == p or (q.terms == p.terms and q.coef[:2] == p.coef[:2] and q.setup == p.setup)
    assert np.array_equal(q.predict(rows), p.predict(rows))
    (tmp_path / "bad.json").write_text('{"terms": []}')
    with pytest.raises(ValueError, match="schema version"):
        predict.Predictor.load(str(tmp_path / "bad.json"))


def test_bad_terms_and_data_fail_clearly():
    rows = synthetic_rows(20, seed=4)
    with pytest.raises(ValueError, match="log\\(name\\)"):
        predict.Predictor.fit(rows, ["exp(fisher_diag)"])
    with pytest.raises(ValueError, match="needs feature 'noise_rise'"):
        predict.Predictor.fit(rows, ["log(noise_rise)"])
    with pytest.raises(ValueError, match="usable rows"):
        predict.Predictor.fit(rows[:3], ["log(fisher_diag)", "nll_base"])
    with pytest.raises(ValueError, match="at least two models"):
        predict.validate([{**r, "model": "one"} for r in rows], ["log(fisher_diag)"], by="models")


def test_metrics_of_perfect_and_reversed_predictions():
    true = np.array([0.01, 0.02, 0.05, 0.1, 0.3])
    ratio = np.array([0.5, 0.51, 0.52, 0.9, 0.91])
    m = predict.metrics(true, true, ratios=ratio)
    # spearmanr computes a Pearson correlation of ranks: exact ranks, one rounding off 1.
    assert m["r2_log"] == 1.0 and m["mae"] == 0.0 and m["spearman"] == pytest.approx(1.0, abs=1e-12)
    assert m["pairs_same_ratio"] == 1.0 and m["n_pairs"] == 4  # (0,1) (0,2) (1,2) (3,4)
    r = predict.metrics(true, true[::-1], ratios=ratio)
    assert r["spearman"] == pytest.approx(-1.0, abs=1e-12) and r["pairs_same_ratio"] == 0.0


def test_leave_one_model_out_predicts_a_model_from_the_others():
    rows = synthetic_rows(90, seed=5)  # three models sharing one law
    v = predict.validate(rows, ["log(fisher_diag)", "nll_base"], by="models")
    assert set(v["per_model"]) == {"m0", "m1", "m2"} and v["k"] == 3
    assert v["overall"]["r2_log"] > 0.99 and v["overall"]["spearman"] > 0.99


def size_rows():
    """Three sizes, two training seeds each, 19 plans from Q_r 0.1 to 1.0 on an exact law:
    delta NLL = 0.5 * fisher_diag * (params / 1e6)^-0.3, fisher_diag = Q_r^2 * (1 + 0.1 * seed).
    At 10% the measured Q_r,max is about 0.31, 0.44 and 0.62 from the smallest size up (seed 0)."""
    rows = []
    for params in (100_000, 1_000_000, 10_000_000):
        for train_seed in (0, 1):
            for i, ratio in enumerate(np.linspace(0.1, 1.0, 19)):
                fisher = ratio**2 * (1 + 0.1 * train_seed)
                dnll = 0.5 * fisher * (params / 1e6) ** -0.3
                rows.append(
                    {
                        "model": f"s{params}-t{train_seed}",
                        "plan_id": i,
                        "params": params,
                        "ratio": float(ratio),
                        "fisher_diag": float(fisher),
                        "delta_ppl": math.expm1(dnll),
                    }
                )
    return rows


def test_leave_one_size_out_predicts_each_sizes_q_r_max_from_the_others():
    rows = size_rows()
    exact = predict.leave_one_size_out(rows, ["log(fisher_diag)", "log(params)"])
    assert exact["by"] == "sizes" and exact["k"] == 3 and exact["budgets"] == [0.05, 0.1, 0.2]
    assert [c["model"] for c in exact["curves"]] == [
        f"s{p}-t{t}" for p in (100_000, 1_000_000, 10_000_000) for t in (0, 1)
    ]
    for c in exact["curves"]:
        # The law is linear in both terms, so the other two sizes pin it exactly (float rounding).
        assert c["n_plans"] == 19 and c["curve_mae"] == pytest.approx(0, abs=1e-12)
        for b in c["budgets"]:
            assert b["measured"]["status"] == "interpolated" and b["error"] == pytest.approx(0, abs=1e-9)
    at_10 = [next(b for b in c["budgets"] if b["budget"] == 0.1)["measured"]["value"] for c in exact["curves"]]
    assert at_10[0] < at_10[2] < at_10[4] and at_10[0] == pytest.approx(0.31, abs=0.02)

    # Without the size term the predictor cannot tell sizes apart: a held-out small model is
    # predicted from larger, more tolerant ones (its Q_r,max overestimated), a large one the
    # other way; had its own size been in the training, the errors would not have these signs.
    blind = predict.leave_one_size_out(rows, ["log(fisher_diag)"], budgets=(0.1,))
    errors = {c["model"]: c["budgets"][0]["error"] for c in blind["curves"]}
    assert errors["s100000-t0"] > 0.1 and errors["s10000000-t0"] < -0.1
    mae = {c["model"]: c["curve_mae"] for c in blind["curves"]}
    # the middle size sits at the geometric mean of the other two, which the blind fit learns
    assert mae["s100000-t0"] > 0.1 and mae["s10000000-t0"] > 0.1 and mae["s1000000-t0"] < 1e-12


def test_cli_fit_validates_by_size(tmp_path, capsys):
    data = tmp_path / "sizes.csv"
    predict.write_data(str(data), [{**r, "low": "mxint4", "high": "bf16"} for r in size_rows()])
    args = ["predict", "fit", str(data), "--out", str(tmp_path / "p.json"), "--terms", "log(fisher_diag),log(params)"]
    assert main([*args, "--validate", "sizes", "--budgets", "0.1", "--json", str(tmp_path / "fit.json")]) == 0
    text = capsys.readouterr().out
    assert "held-out validation (leave one size out)" in text and "Q_r,max at 10%: measured / predicted" in text
    sizes = json.loads((tmp_path / "fit.json").read_text())["validation"]["sizes"]
    assert sizes["budgets"] == [0.1] and len(sizes["curves"]) == 6 and "predictions" not in sizes
    with pytest.raises(ValueError, match="at least two model sizes"):
        predict.validate([{**r, "params": 5} for r in size_rows()], ["log(fisher_diag)"], by="sizes")


# ---- features of a tiny model -------------------------------------------------------------------


def _space(graph, low="mxint4", block_size=None):
    low_p, high_p = search_precisions(low, "bf16", weights_only=False)
    return SearchSpace(graph, "matmul", low_p, high_p, Budget("params", 0.0), block_size)


@functools.cache
def _features():
    _, graph = captured("llama")
    space = _space(graph)
    qmodel = mpqc.compile(graph, space.plan([]))
    windows = mpqc.evaluate.sample_windows(TOKENS, 16, 4, 1)
    return qmodel, space, windows, predict.Features(qmodel, space, windows, probe_samples=2)


def test_per_window_gradients_give_the_fisher_diag_feature():
    qmodel, space, windows, feats = _features()
    g = fisher_gradients(qmodel, space, windows)
    for i, c in enumerate(space.components):
        assert feats.sensitivity[c.name] == pytest.approx(0.5 * np.mean(g[:, i] ** 2), rel=1e-12, abs=1e-300)
        assert feats.features([c.name])["fisher_diag"] == pytest.approx(feats.sensitivity[c.name], rel=1e-12)


def test_no_low_components_means_zero_features():
    *_, feats = _features()
    f = feats.features([])
    assert {k: f[k] for k in ("ratio", "fisher", "fisher_diag", "first_order", "weight_noise", "noise_rise")} == {
        "ratio": 0.0,
        "fisher": 0.0,
        "fisher_diag": 0.0,
        "first_order": 0.0,
        "weight_noise": 0.0,
        "noise_rise": 0.0,
    }
    assert f["params"] == sum(p.numel() for p in captured("llama")[0].parameters())
    assert f["nll_base"] > 0 and math.isfinite(f["noise_rise_all"])


def test_more_low_components_give_larger_features():
    _, space, _, feats = _features()
    weighted = [c.name for c in space.components if c.params]
    previous = feats.features([])
    for k in range(1, len(weighted) + 1):
        f = feats.features(weighted[:k])
        # Sums of positive per-component terms: strictly larger with each weight component added.
        assert f["fisher_diag"] > previous["fisher_diag"] and f["weight_noise"] > previous["weight_noise"]
        assert f["ratio"] > previous["ratio"]
        previous = f
    assert previous["ratio"] == 1.0
    everything = feats.features([c.name for c in space.components])
    assert everything["noise_rise"] == feats.noise_rise_all  # the same noise on the same weights
    assert everything["weight_noise"] == pytest.approx(
        sum(
            float(
                (
                    (
                        mpqc.formats.quantize(
                            feats.qmodel.weight(m.name).detach(), "mxint4", axis=m.weight_reduction_axis
                        )
                        - feats.qmodel.weight(m.name).detach().bfloat16().float()
                    )
                    ** 2
                ).sum()
            )
            for c in space.components
            for m in c.matmuls
            if m.params
        )
        / feats._weight_total,
        rel=1e-6,
    )


def test_features_of_a_plan_equal_those_of_its_low_components():
    qmodel, space, _, feats = _features()
    names = [c.name for c in space.components]
    plan = space.plan(names[1:6])
    assert feats.features(plan) == feats.features(names[1:6])
    other = mpqc.Plan(space.graph, {names[0]: "mxfp4"}, default="bf16")
    with pytest.raises(ValueError, match="other precisions"):
        feats.features(other)
    with pytest.raises(KeyError, match="unknown components"):
        feats.features(["not.a.component"])


# ---- a real collection on a trained tiny model --------------------------------------------------


def train_briefly(model, tokens, *, steps, seq_len, generator, lr=3e-3, cosine=False):
    """``steps`` AdamW steps on batches of 8 random windows of ``tokens``; the model, in eval mode.
    ``cosine``: the learning rate decays to zero over the steps (a cosine schedule), so that the
    last steps settle into a minimum instead of jittering around it at the full rate."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - seq_len - 1, (8,), generator=generator)
        x = tokens[starts[:, None] + torch.arange(seq_len)]
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()
    return model.eval()


@functools.cache
def trained_tiny():
    """A tiny Llama trained for 300 steps, the learning rate decaying to zero, on a two-successor
    Markov chain (a few seconds): a model at a minimum, so that quantization costs loss in
    proportion to where it lands.

    At a constant rate (150 steps, as this was first) the model is not at one: held-out NLL 0.81
    and still moving (floor ln 2 = 0.69), so on plan seed 0 17 of the 40 plans measured a loss
    *fall*, and which seeds pass depended on the last bits of the training arithmetic (the same
    torch on a CPU dispatching other kernels, ATEN_CPU_CAPABILITY=default: R^2 0.03 -> 0.69).
    With the decay: held-out NLL 0.74, at most 5 of 40 plans at or below the baseline."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    successors = torch.randint(0, 128, (128, 2), generator=g)
    choice = torch.randint(0, 2, (12000,), generator=g)
    stream = [0]
    for i in range(11999):
        stream.append(int(successors[stream[-1], choice[i]]))
    tokens = torch.tensor(stream)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    return train_briefly(model, tokens[:10000], steps=300, seq_len=32, generator=g, cosine=True), tokens


def test_collection_fit_and_held_out_ranking_on_a_trained_tiny_model():
    model, tokens = trained_tiny()
    graph = mpqc.capture(model, (example_ids(),))
    # MXINT4 with one scale per tensor: harsh enough that the plan, not the window noise, decides the loss.
    rows = predict.collect(
        graph,
        tokens[:10000],
        tokens[10000:],
        model="tiny",
        n_plans=40,
        low="mxint4",
        block_size="tensor",
        seq_len=32,
        calib_samples=4,
        probe_samples=2,
        eval_samples=16,
        progress=False,
    )
    assert len(rows) == 40 and len({r["low_components"] for r in rows}) == 40
    assert all(0.2 - 1e-9 <= r["ratio"] and r["ratio"] >= r["target_ratio"] - 1e-9 for r in rows)
    assert all(r["dnll"] == pytest.approx(math.log1p(r["delta_ppl"])) for r in rows)
    ours = predict.validate(rows, ["log(fisher_diag)"], by="plans", k=5)["overall"]
    ratio_only = predict.validate(rows, ["log(ratio)"], by="plans", k=5)["overall"]
    # Measured over plan seeds 0-2, torch 2.13 CPU with its AVX2 and its default kernels (the
    # decayed model lands on the same held-out NLL, 0.7427, under both): R^2 0.57-0.75 (Q_r alone
    # -0.20-0.50), Spearman 0.80-0.89, same-ratio pairs 0.65-0.82, where the ratio alone orders
    # those pairs worse than chance (0.34-0.38). Another init seed (1) is a different model:
    # there plan seed 1 has Spearman 0.62, the others pass.
    assert ours["r2_log"] > 0.4 and ours["r2_log"] > ratio_only["r2_log"]
    assert ours["spearman"] > 0.7
    assert ours["pairs_same_ratio"] > 0.6 and ours["n_pairs"] >= 20


# ---- the command line ---------------------------------------------------------------------------

WORDS = (
    "the a of and to in is was for on with as by at from that it his her they which this be not or "
    "are an were had has but first also one new two time year city after who its more other may"
).split()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A small Llama trained briefly on a two-successor Markov chain over WORDS, with a
    word-level tokenizer, and the text (so that quantizing it costs loss)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("predict")
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    tokenizer.save_pretrained(d / "tiny")
    rng = random.Random(0)
    successors = {w: rng.sample(WORDS, 2) for w in WORDS}
    words = ["the"]
    for _ in range(5999):
        words.append(rng.choice(successors[words[-1]]))
    (d / "text.txt").write_text(" ".join(words))
    ids = torch.tensor([vocab[w] for w in words])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = train_briefly(
        LlamaForCausalLM(config), ids[:5000], steps=100, seq_len=16, generator=torch.Generator().manual_seed(0)
    )
    model.save_pretrained(d / "tiny")
    return d


def test_cli_collect_fit_plan_round_trip(saved_model, tmp_path, capsys):
    d = saved_model
    data, pred, out = tmp_path / "data.csv", tmp_path / "p.json", tmp_path / "out.json"
    collect = [
        "predict",
        "collect",
        str(d / "tiny"),
        "--text",
        str(d / "text.txt"),
        "--out",
        str(data),
        "--n-plans",
        "12",
        "--seq-len",
        "16",
        "--calib-samples",
        "3",
        "--probe-samples",
        "2",
        "--eval-samples",
        "4",
        "--block-size",
        "tensor",
        "--quiet",
    ]
    assert main(collect) == 0
    rows = predict.read_data(str(data))
    assert len(rows) == 12 and {r["model"] for r in rows} == {"tiny"}
    assert main(collect) == 0  # finished plans are not measured again
    assert predict.read_data(str(data)) == rows
    assert "0 new plans (12 in all)" in capsys.readouterr().out

    assert (
        main(
            [
                "predict",
                "fit",
                str(data),
                "--out",
                str(pred),
                "--terms",
                "log(fisher_diag),log(ratio)",
                "--json",
                str(tmp_path / "fit.json"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "log(fisher_diag)" in text and "held-out validation (5-fold over plans)" in text
    p = predict.Predictor.load(str(pred))
    assert p.terms == ("log(fisher_diag)", "log(ratio)") and p.setup["seq_len"] == 16
    assert "plans" in json.loads((tmp_path / "fit.json").read_text())["validation"]

    # Two plans of the model: the low components of the first and last collected rows.
    graph = mpqc.capture(mpqc.load_model(str(d / "tiny"))[0], (torch.zeros(2, 16, dtype=torch.long),))
    paths = []
    for i, row in enumerate((rows[0], rows[-1])):
        plan = mpqc.Plan(
            graph, {n: "mxint4" for n in row["low_components"].split(";")}, default="bf16", block_size="tensor"
        )
        path = tmp_path / f"plan{i}.json"
        path.write_text(plan.to_json())
        paths.append(path)
    assert (
        main(
            [
                "predict",
                "plan",
                str(d / "tiny"),
                "--predictor",
                str(pred),
                "--plan",
                str(paths[0]),
                "--plan",
                str(paths[1]),
                "--text",
                str(d / "text.txt"),
                "--measure",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    by_plan = {r["plan"]: r for r in result["plans"]}
    expected = p.predict([rows[0], rows[-1]])
    for path, row, want in zip(paths, (rows[0], rows[-1]), expected):
        got = by_plan[str(path)]
        # The same features measured again the same way: the prediction of the collected row.
        assert got["predicted_delta_ppl"] == pytest.approx(float(want), rel=1e-9)
        assert got["measured_delta_ppl"] == pytest.approx(row["delta_ppl"], rel=1e-9, abs=1e-12)


def test_cli_errors_are_clear(saved_model, tmp_path, capsys):
    assert main(["predict", "fit", str(tmp_path / "missing.csv")]) == 2
    assert "mpqc predict collect" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["predict", "fit", str(bad)]) == 2
    assert "lacks columns" in capsys.readouterr().err
    rows = synthetic_rows(20, seed=6)
    predict.write_data(str(tmp_path / "syn.csv"), [{**r, "low": "mxint4", "high": "bf16"} for r in rows])
    assert main(["predict", "fit", str(tmp_path / "syn.csv"), "--terms", "log(fisher_diag)", "--models", "nope"]) == 2
    assert "does not have" in capsys.readouterr().err
    assert main(["predict", "collect", "--out", str(tmp_path / "x.csv"), "--n-plans", "0"]) == 2
    assert "--n-plans must be a positive integer" in capsys.readouterr().err


def test_cli_compile_and_search_run_the_model_in_the_dtype_asked(saved_model, tmp_path, capsys):
    """--dtype bfloat16 (what a GPU run uses) loads, captures, compiles and searches in bf16."""
    d = saved_model
    common = [
        str(d / "tiny"),
        "--dtype",
        "bfloat16",
        "--text",
        str(d / "text.txt"),
        "--seq-len",
        "16",
        "--n-samples",
        "4",
        "--batch-size",
        "4",
    ]
    assert main(["compile", *common, "--json", str(tmp_path / "c.json")]) == 0
    assert "perplexity unquantized (torch.bfloat16)" in capsys.readouterr().out
    result = json.loads((tmp_path / "c.json").read_text())
    assert 1 < result["perplexity_fp32"] < result["perplexity_quantized"]
    assert (
        main(
            [
                "search",
                *common,
                "--ratio",
                "0.5",
                "--n-trials",
                "2",
                "--sampler",
                "random",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    found = json.loads((tmp_path / "s" / "result.json").read_text())
    assert abs(found["achieved"] - 0.5) < 0.2 and found["holdout"]["perplexity_plan"] > 1
    assert main(["compile", str(d / "tiny"), "--device", "gpu"]) == 2
    assert "device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'" in capsys.readouterr().err


def test_cli_collect_keeps_kept_high_components_out_of_every_plan_and_q_r(saved_model, tmp_path):
    d = saved_model
    data = tmp_path / "data.csv"
    args = ["predict", "collect", str(d / "tiny"), "--text", str(d / "text.txt"), "--out", str(data)]
    args += ["--n-plans", "6", "--seq-len", "16", "--calib-samples", "2", "--eval-samples", "2", "--quiet"]
    assert main([*args, "--keep-high", "lm_head", "--min-ratio", "0.9"]) == 0
    rows = predict.read_data(str(data))
    assert len(rows) == 6 and {r["keep_high"] for r in rows} == {"lm_head"}
    assert not any("lm_head" in r["low_components"].split(";") for r in rows)
    graph = mpqc.capture(mpqc.load_model(str(d / "tiny"))[0], (torch.zeros(2, 16, dtype=torch.long),))
    for r in rows:  # Q_r over the other matmuls, as the plan itself counts it
        plan = mpqc.Plan(graph, {n: "mxint4" for n in r["low_components"].split(";")}, keep_high=("lm_head",))
        assert r["ratio"] == pytest.approx(plan.quantization_ratio()) and r["ratio"] >= 0.9 - 1e-9
    assert main(args) == 0  # without keep_high: another setup, measured anew beside the first
    again = predict.read_data(str(data))
    assert len(again) == 12 and len({r["setup"] for r in again}) == 2
    assert {r["keep_high"] for r in again} == {"lm_head", ""}
