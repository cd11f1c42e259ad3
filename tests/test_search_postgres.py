"""Two `mpqc search` workers share one study on a real PostgreSQL server.

The fixture starts a throwaway server (Debian's postgresql: installed with apt-get by the
test itself where it is missing and the test runs as root) on a free loopback port."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import optuna
import pytest

from mpqc.search.workers import measured

HERE = os.path.dirname(__file__)


def _pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def _ensure_postgres() -> str:
    bindir = _pg_bin()
    if bindir is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], check=True, env=env)
        bindir = _pg_bin()
    if bindir is None:
        pytest.fail("PostgreSQL is not installed and cannot be installed here: apt-get install postgresql")
    return bindir


def _as_postgres(cmd: list[str]) -> list[str]:
    # The server refuses to run as root; Debian's package makes a 'postgres' user for it.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg2", reason="pip install psycopg2-binary (in the test extra)")
    bindir = _ensure_postgres()
    root = tempfile.mkdtemp(prefix="mpqc-pg-")
    os.chmod(root, 0o755)
    data = os.path.join(root, "data")
    os.makedirs(data)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(data, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(
        _as_postgres([f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "postgres"]), check=True, capture_output=True
    )
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    subprocess.run(
        _as_postgres([f"{bindir}/pg_ctl", "-D", data, "-o", opts, "-l", f"{root}/log", "-w", "start"]),
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            _as_postgres([f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mpqc"]),
            check=True,
            capture_output=True,
        )
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mpqc"
    finally:
        subprocess.run(_as_postgres([f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_study(postgres_url):
    workers = [
        subprocess.Popen([sys.executable, os.path.join(HERE, "search_worker.py"), postgres_url, "pg", "10"])
        for _ in range(2)
    ]
    for w in workers:
        assert w.wait(timeout=300) == 0
    study = optuna.load_study(study_name="pg", storage=postgres_url)
    complete = [t for t in study.trials if measured(t)]
    # Each worker stops once the study holds 10 complete trials; one finishing its last
    # trial as the other reaches 10 can add one more.
    assert 10 <= len(complete) <= 11
    pids = {w.pid for w in workers}
    seen = {int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in complete}
    assert seen == pids  # both did work
    assert len({t.number for t in complete}) == len(complete)


# ---- distinct trials and shared sweeps (issue 17) ------------------------------------------------


def _search_cli(model_dir, text, storage, n_trials, out):
    """`mpqc search` in its own process, the same command on every worker."""
    code = "import sys; from mpqc.cli import main; sys.exit(main())"
    argv = [sys.executable, "-c", code, "search", str(model_dir), "--text", str(text), "--seq-len", "16"]
    argv += ["--n-samples", "4", "--ratio", "0.5", "--storage", storage, "--study-name", "cli"]
    argv += ["--n-trials", str(n_trials), "--out", str(out)]
    return subprocess.Popen(argv, cwd=os.path.dirname(HERE), stderr=subprocess.PIPE, text=True)


def test_two_workers_and_a_restart_give_distinct_plans_and_exactly_n_trials(postgres_url, tmp_path):
    from test_sweep import save_tiny_llama, write_text

    save_tiny_llama(tmp_path / "tiny", hidden=32, layers=2)
    write_text(tmp_path / "text.txt")
    workers = [
        _search_cli(tmp_path / "tiny", tmp_path / "text.txt", postgres_url, 6, tmp_path / f"w{i}") for i in range(2)
    ]
    for w in workers:
        assert w.wait(timeout=600) == 0, w.stderr.read()
    restart = _search_cli(tmp_path / "tiny", tmp_path / "text.txt", postgres_url, 9, tmp_path / "r")
    assert restart.wait(timeout=600) == 0, restart.stderr.read()
    study = optuna.load_study(study_name="cli", storage=postgres_url)
    complete = [t for t in study.trials if measured(t)]  # completed, or stopped early by the pruner
    assert len(complete) == 9  # exactly --n-trials: the workers did not overshoot
    assert len({frozenset(t.user_attrs["low"]) for t in complete}) == 9  # no plan scored twice
    assert not any(t.user_attrs.get("seeded") for t in study.trials)  # the default (refine) enqueues none
    assert not [t for t in study.trials if t.state.name in ("WAITING", "RUNNING")]
    assert len(optuna.load_study(study_name="cli:workers", storage=postgres_url).trials) == 3


SWEEP = """
out = "{out}"
text = "text.txt"
models = ["tiny"]

[grid]
granularity = ["matmul"]
ratio = [0.3, 0.5, 0.7, 0.9]
formats = ["mxint4"]

[search]
sampler = "random"
n_trials = 3
seq_len = 16
n_samples = 8
storage = "{storage}"

[eval]
n_samples = 4
"""


def test_a_sweep_of_four_cells_on_two_workers_runs_each_cell_once(postgres_url, tmp_path):
    from test_sweep import save_tiny_llama, write_text

    from mpqc.studies import sweep

    save_tiny_llama(tmp_path / "tiny", hidden=32, layers=2)
    write_text(tmp_path / "text.txt")
    code = "import sys; from mpqc.cli import main; sys.exit(main())"
    procs = []
    for i in range(2):
        (tmp_path / f"w{i}.toml").write_text(SWEEP.format(out=f"results-{i}.csv", storage=postgres_url))
        argv = [sys.executable, "-c", code, "sweep", str(tmp_path / f"w{i}.toml"), "--quiet"]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    ran = 0
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        ran += int(out.split("sweep: ran ")[1].split()[0])
    assert ran == 4  # every cell run by exactly one of the two workers
    config = sweep.load_config(str(tmp_path / "w0.toml"))
    for cell in config.cells():
        key = config.key(cell)
        claims = optuna.load_study(study_name=f"sweep-{key}:cell", storage=postgres_url)
        assert sum(t.state.name == "COMPLETE" for t in claims.trials) == 1
        search = optuna.load_study(study_name=f"sweep-{key}", storage=postgres_url)
        assert sum(t.state.name == "COMPLETE" for t in search.trials) == 3
    # Each worker wrote the complete table, the same one.
    tables = [(tmp_path / f"results-{i}.csv").read_text() for i in range(2)]
    assert tables[0] == tables[1]
    rows = sweep.read_results(str(tmp_path / "results-0.csv"))
    assert sorted(r["ratio"] for r in rows) == [0.3, 0.5, 0.7, 0.9] and len({r["key"] for r in rows}) == 4
