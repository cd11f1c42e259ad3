"""mpqc.search.lm_eval_adapter: the lm-eval LM adapter against direct computation, custom tasks on
local data (no dataset hub), the search objective and the CLI.

Every expected number is computed here from the compiled model's logits, independently of the
adapter's batching and of lm-eval's pipeline. The plan quantizes weights and activations with
MXINT4, whose attention-values blocks run along the sequence: padding would change the real
tokens' numbers, so a padded implementation fails these comparisons.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from tiny_models import VOCAB, captured

import mpqc

HERE = os.path.dirname(__file__)
DATA = os.path.join(HERE, "data", "lm_eval")
TOKENS = torch.randint(0, VOCAB, (8000,), generator=torch.Generator().manual_seed(0))
FAST = dict(seq_len=16, n_samples=2, progress=False)
# Float tolerance: the adapter and the reference run the same float32 forward on the same
# tokens; batching rows together may reassociate sums in the matmuls (~1e-6 on these values).
TOL = 1e-5

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm_eval is not installed (pip install 'mpqc[lmeval]'; the test extra has it)",
)


def char_tokenizer():
    """A character-level tokenizer with exactly the tiny models' 128 ids, built offline.

    0-3 are <pad> <s> </s> <unk>; then newline, printable ASCII and 28 Latin-1 letters, so
    every id the model can emit decodes to a character or a special token.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)] + [chr(c) for c in range(0xC0, 0xC0 + 28)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: 4 + i for i, c in enumerate(chars)}}
    assert len(vocab) == VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


TOK = char_tokenizer()


def enc(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def qmodel():
    _, graph = captured("llama")
    return mpqc.compile(graph, mpqc.Plan.uniform(graph, "mxint4"))


def task_yaml(tmp_path, name: str) -> str:
    """The task YAML from tests/data with its data file made absolute (lm-eval reads it relative to the cwd)."""
    text = open(os.path.join(DATA, f"{name}.yaml")).read()
    text = text.replace(f"tests/data/lm_eval/{name}.jsonl", os.path.join(DATA, f"{name}.jsonl"))
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def logits_of(qmodel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return qmodel(torch.tensor([ids]))[0].double()


def direct_loglikelihood(qmodel, context: list[int], continuation: list[int], max_length: int):
    inp = (context + continuation)[-(max_length + 1) :][:-1]
    logprobs = F.log_softmax(logits_of(qmodel, inp)[-len(continuation) :], dim=-1)
    target = torch.tensor(continuation)
    return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


def requests(kind, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


# ---- the adapter ---------------------------------------------------------------------------------


@needs_lm_eval
def test_loglikelihood_equals_the_models_logits(qmodel):
    from mpqc.search.lm_eval_adapter import MpqcLM

    ctx = "Question: 2+2?\nAnswer:"
    greedy_token = int(logits_of(qmodel, enc(ctx))[-1].argmax())
    cases = [  # (context, continuation) as lm-eval asks, and the tokens it must score
        ((ctx, " 4"), enc(ctx), enc(" 4")),
        ((ctx, " four"), enc(ctx), enc(" four")),
        (("Hello ", "world"), enc("Hello"), enc(" world")),  # a trailing space moves to the continuation
        (("", "abc"), [TOK.bos_token_id], enc("abc")),  # an empty context is the BOS token
        (("x" * 50 + "yz", " long tail"), enc("x" * 50 + "yz"), enc(" long tail")),  # left-truncated to 32
        ((ctx, TOK.decode([greedy_token])), enc(ctx), [greedy_token]),  # greedy by construction
    ]
    expected = [direct_loglikelihood(qmodel, c, k, 32) for _, c, k in cases]
    assert expected[-1][1] is True and not all(g for _, g in expected)
    for batch_size in (1, 3, 8):
        got = MpqcLM(qmodel, TOK, batch_size=batch_size, max_length=32).loglikelihood(
            requests("loglikelihood", [a for a, _, _ in cases]), disable_tqdm=True
        )
        assert [g for _, g in got] == [g for _, g in expected]
        for (value, _), (want, _) in zip(got, expected):
            assert abs(value - want) < TOL


@needs_lm_eval
def test_loglikelihood_rolling_scores_every_token_once(qmodel):
    from mpqc.search.lm_eval_adapter import MpqcLM

    L = 16
    lm = MpqcLM(qmodel, TOK, batch_size=4, max_length=L)
    texts = ["The cat sat on the mat while the dog slept by the door.", "short", ""]

    def reference(text):
        t = enc(text)
        s = [TOK.bos_token_id] + t  # s[i + 1] = t[i]; the first token is predicted from BOS
        total = 0.0
        for p in range(0, len(t), L):  # predict t[p:end], each window with as much context as fits
            end = min(p + L, len(t))
            inp = s[max(0, end - L) : end]
            logprobs = F.log_softmax(logits_of(qmodel, inp), dim=-1)[-(end - p) :]
            total += logprobs.gather(-1, torch.tensor(t[p:end])[:, None]).sum().item()
        return total

    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    assert len(enc(texts[0])) > 3 * L  # several windows, the last one partial
    assert got[2] == 0.0
    for value, text in zip(got, texts):
        assert abs(value - reference(text)) < TOL


@needs_lm_eval
def test_generate_until_is_greedy_and_stops(qmodel):
    from mpqc.search.lm_eval_adapter import MpqcLM

    def greedy(context: str, n: int) -> list[int]:
        ids, out = enc(context), []
        for _ in range(n):
            token = int(logits_of(qmodel, ids)[-1].argmax())
            if token == TOK.eos_token_id:
                break
            ids.append(token)
            out.append(token)
        return out

    contexts = ["Once upon a time", "Once upon a tide", "Q: 1+1?\nA:"]  # two of one length: one batch
    full = {c: TOK.decode(greedy(c, 12), skip_special_tokens=True) for c in contexts}
    stop = full[contexts[0]][5]
    assert stop not in full[contexts[0]][:2]  # the stop string really cuts the text short
    lm = MpqcLM(qmodel, TOK, batch_size=4, max_length=64)
    args = [
        (contexts[0], {"until": [stop], "max_gen_toks": 12, "do_sample": False}),
        (contexts[1], {"until": "\n\n", "max_gen_toks": 12}),
        (contexts[2], {"until": [], "max_gen_toks": 7}),
    ]
    got = lm.generate_until(requests("generate_until", args), disable_tqdm=True)
    assert got[0] == full[contexts[0]].split(stop)[0]
    assert got[1] == full[contexts[1]].split("\n\n")[0]
    assert got[2] == TOK.decode(greedy(contexts[2], 7), skip_special_tokens=True)
    # Generation stops at the step whose token completes the stop string, not at max_gen_toks.
    calls = []

    class Counting(torch.nn.Module):
        def forward(self, input_ids):
            calls.append(input_ids.shape)
            return qmodel(input_ids)

    tokens = greedy(contexts[0], 12)
    steps = next(j + 1 for j in range(len(tokens)) if stop in TOK.decode(tokens[: j + 1], skip_special_tokens=True))
    counted = MpqcLM(Counting(), TOK, max_length=64).generate_until(requests("generate_until", args[:1]))
    assert counted == got[:1] and len(calls) == steps < 12
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until(requests("generate_until", [("x", {"do_sample": True, "temperature": 0.7})]))
    with pytest.raises(ValueError, match="repetition_penalty"):
        lm.generate_until(requests("generate_until", [("x", {"repetition_penalty": 1.2})]))


# ---- tasks ---------------------------------------------------------------------------------------


@needs_lm_eval
def test_custom_multiple_choice_task_accuracy(qmodel, tmp_path):
    from mpqc.search.lm_eval_adapter import MpqcLM, evaluate_task

    yaml_path = task_yaml(tmp_path, "easy_qa")
    score = evaluate_task(qmodel, TOK, yaml_path, limit=8, max_length=128)
    docs = [json.loads(line) for line in open(os.path.join(DATA, "easy_qa.jsonl"))][:8]
    lm = MpqcLM(qmodel, TOK, max_length=128)
    correct = []
    for d in docs:
        lls = lm.loglikelihood(
            requests("loglikelihood", [(f"Question: {d['question']}\nAnswer:", f" {c}") for c in d["choices"]]),
            disable_tqdm=True,
        )
        values = [v for v, _ in lls]
        correct.append(values.index(max(values)) == d["answer"])
    assert score.task == "mpqc_easy_qa" and score.metric == "acc,none" and score.higher_is_better
    assert score.value == sum(correct) / len(correct)
    assert score.loss == -score.value
    with pytest.raises(ValueError, match="no such metric.*acc,none"):
        evaluate_task(qmodel, TOK, yaml_path, metric="f1", limit=2, max_length=128)


@needs_lm_eval
def test_custom_perplexity_task_is_minimized(qmodel, tmp_path):
    from mpqc.search.lm_eval_adapter import MpqcLM, evaluate_task

    score = evaluate_task(qmodel, TOK, task_yaml(tmp_path, "short_texts"), metric="byte_perplexity", max_length=48)
    texts = [json.loads(line)["text"] for line in open(os.path.join(DATA, "short_texts.jsonl"))]
    lls = MpqcLM(qmodel, TOK, max_length=48).loglikelihood_rolling(
        requests("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True
    )
    expected = math.exp(-sum(lls) / sum(len(t.encode()) for t in texts))
    assert score.metric == "byte_perplexity,none" and not score.higher_is_better
    assert score.loss == score.value and abs(score.value - expected) < 1e-6 * expected


# ---- the search objective --------------------------------------------------------------------------


@needs_lm_eval
def test_search_with_an_lm_eval_objective(tmp_path):
    from mpqc.search.lm_eval_adapter import LMEvalObjective, evaluate_task

    _, graph = captured("llama")
    yaml_path = task_yaml(tmp_path, "easy_qa")
    objective = LMEvalObjective(task=yaml_path, tokenizer=TOK, limit=6, max_length=128)
    db = str(tmp_path / "s.db")
    qmodel = mpqc.compile(graph, mpqc.Plan.uniform(graph, "bf16"))
    result = mpqc.search.run(
        graph,
        TOKENS,
        ratio=0.5,
        sampler="random",
        n_trials=3,
        seed=2,
        objective=objective,
        qmodel=qmodel,
        storage=db,
        study_name="lm",
        **FAST,
    )
    assert objective.lm(qmodel).model is qmodel  # trials scored the search's one compiled model
    trials = [t for t in result.study.trials if t.state.name == "COMPLETE"]
    assert len(trials) == 3
    for t in trials:
        a = t.user_attrs
        assert a["metric_name"] == "acc,none" and 0.0 <= a["metric"] <= 1.0
        assert t.value == a["objective"] == -a["metric"] and a["perplexity"] > 1.0
    assert result.study.best_value == -result.metric
    assert result.objective["metric"] == "acc,none" and result.objective["higher_is_better"] is True
    # The best plan, compiled afresh, scores the same on the task and on the windows.
    fresh = mpqc.compile(graph, result.plan)
    assert evaluate_task(fresh, TOK, yaml_path, limit=6, max_length=128).value == result.metric
    windows = mpqc.evaluate.sample_windows(TOKENS, 16, 2, 2)
    assert result.perplexity == mpqc.evaluate.perplexity(fresh, windows=windows, progress=False)
    table = result.trials_table()
    assert [r["metric"] for r in table] == [t.user_attrs["metric"] for t in trials]
    assert table[-1]["best_so_far"] == max(r["metric"] for r in table)

    # A stored study made with another objective (or another limit) is refused, and left as it was.
    with pytest.raises(
        ValueError, match=r"made with objective lm-eval mpqc_easy_qa \(limit 6\), asked perplexity on windows"
    ):
        mpqc.search.run(
            graph, TOKENS, ratio=0.5, sampler="random", n_trials=4, seed=2, storage=db, study_name="lm", **FAST
        )
    other = LMEvalObjective(task=yaml_path, tokenizer=TOK, limit=5, max_length=128)
    with pytest.raises(ValueError, match="created for another search.*objective"):
        mpqc.search.run(
            graph,
            TOKENS,
            ratio=0.5,
            sampler="random",
            n_trials=4,
            seed=2,
            objective=other,
            storage=db,
            study_name="lm",
            **FAST,
        )
    assert len(result.study.trials) == 3


@needs_lm_eval
def test_cli_search_with_an_lm_eval_task(tmp_path, monkeypatch, capsys):
    from mpqc import cli

    _, graph = captured("llama")
    monkeypatch.setattr(cli.common, "load_and_capture", lambda spec, seq_len, device, dtype: (None, TOK, graph))
    monkeypatch.setattr(mpqc.models, "load_tokenizer", lambda spec, **kw: TOK)  # the text is checked first
    text = tmp_path / "text.txt"
    text.write_text(" ".join(json.loads(line)["text"] for line in open(os.path.join(DATA, "short_texts.jsonl"))) * 6)
    out = tmp_path / "out"
    assert (
        cli.main(
            [
                "search",
                "--lm-eval-task",
                task_yaml(tmp_path, "easy_qa"),
                "--lm-eval-limit",
                "4",
                "--lm-eval-metric",
                "acc",
                "--sampler",
                "random",
                "--n-trials",
                "2",
                "--ratio",
                "0.5",
                "--seq-len",
                "16",
                "--n-samples",
                "2",
                "--text",
                str(text),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "result.json").read_text())
    assert result["objective"]["metric"] == "acc,none" and result["objective"]["settings"]["limit"] == 4
    assert 0.0 <= result["metric"] <= 1.0 and 0.0 <= result["objective"]["value_high"] <= 1.0
    assert "metric" in (out / "trials.csv").read_text().splitlines()[0].split(",")
    assert "lm-eval mpqc_easy_qa acc (limit 4)" in capsys.readouterr().out


def test_without_lm_eval_the_error_says_how_to_install(monkeypatch, capsys):
    from mpqc import cli
    from mpqc.search import lm_eval_adapter

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(ImportError, match="pip install lm_eval"):
        lm_eval_adapter.LMEvalObjective(task="mmlu", tokenizer=TOK)
    with pytest.raises(ImportError, match="pip install lm_eval"):
        lm_eval_adapter.require_lm_eval()
    assert cli.main(["search", "--lm-eval-task", "mmlu"]) == 2
    assert "pip install lm_eval" in capsys.readouterr().err


def test_an_objective_without_evaluate_is_refused():
    _, graph = captured("llama")
    with pytest.raises(TypeError, match="objective must have config"):
        mpqc.search.run(graph, TOKENS, ratio=0.5, sampler="random", n_trials=1, objective=object(), **FAST)
