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
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    # Each worker stops once the study holds 10 complete trials; one finishing its last
    # trial as the other reaches 10 can add one more.
    assert 10 <= len(complete) <= 11
    pids = {w.pid for w in workers}
    seen = {int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in complete}
    assert seen == pids  # both did work
    assert len({t.number for t in complete}) == len(complete)
