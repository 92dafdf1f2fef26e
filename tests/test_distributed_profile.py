"""Distributed profiling on a real local Ray instance, every worker writing to one real PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from sqlalchemy import text

from dooly.db import LatencyDB

LIMITS = ["--max-num-batched-tokens", "128", "--max-num-seqs", "8"]
PROFILE = [sys.executable, "-m", "dooly.cli", "profile", "dooly/tiny-llama", "--grid", "reduced", *LIMITS]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TASK_TITLE = "ray::profile_shard"  # the process title Ray gives a worker while it runs a shard


@pytest.fixture(scope="module")
def tiny_plan(tiny_llama_trace):
    from dooly.engine_interface import get_engine
    from dooly.profile import Limits, current_environment, default_threads, plan_profile

    version = get_engine("vllm").version

    env = current_environment("vllm", version(), "bfloat16", default_threads())
    return plan_profile([tiny_llama_trace], env, {}, "reduced", Limits(128, 8))


def _rows(url) -> dict:
    db = LatencyDB(url, create=False)
    with db.engine.connect() as conn:
        rows = conn.execute(text("SELECT signature, point, created, median_us, run_id FROM measurements")).all()
    db.engine.dispose()
    return {(r[0], r[1]): (r[2], r[3], r[4]) for r in rows}


def _shard_workers() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if any(TASK_TITLE in part for part in (p.info["cmdline"] or [])):
            out.append(p)
    return out


def test_shards_cover_every_missing_point_once(tiny_plan):
    from dooly.profile.distributed import shard
    from dooly.profile.runner import _estimate_point_s
    from dooly.db import parse_point

    parts = shard(tiny_plan, 4)
    assert len(parts) == 4
    keys = [(w.signature, p) for part in parts for w, p in part.missing]
    assert sorted(keys) == sorted((w.signature, p) for w, p in tiny_plan.missing)  # all, once each
    loads = [sum(_estimate_point_s(w.text, parse_point(p)) for w, p in part.missing) for part in parts]
    biggest = max(_estimate_point_s(w.text, parse_point(p)) for w, p in tiny_plan.missing)
    assert max(loads) - min(loads) <= biggest + 1e-9  # greedy balance: within one point's cost


def test_worker_killed_mid_run_loses_and_duplicates_nothing(pg_url, tiny_plan):
    expected = {(w.signature, p) for w, p in tiny_plan.missing}
    LatencyDB(pg_url).engine.dispose()  # schema first, so that counting can start at once
    proc = subprocess.Popen([*PROFILE, "--db", pg_url, "--ray-address", "local"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    killed, before = None, {}
    deadline = time.time() + 600
    while killed is None and time.time() < deadline and proc.poll() is None:
        workers = _shard_workers()
        stored = _rows(pg_url)
        if workers and len(stored) >= 6:
            before = stored
            killed = workers[0]
            killed.send_signal(signal.SIGKILL)
        time.sleep(0.1)
    out, err = proc.communicate(timeout=900)
    assert killed is not None, f"no shard worker was seen running: {err[-2000:]}"
    assert proc.returncode == 0, err[-3000:]
    assert not killed.is_running()
    assert 6 <= len(before) < len(expected)  # killed mid-run

    after = _rows(pg_url)
    assert set(after) == expected  # nothing lost
    db = LatencyDB(pg_url, create=False)
    with db.engine.connect() as conn:
        total = conn.execute(text("SELECT count(*) FROM measurements")).scalar()
    assert total == len(expected)  # nothing twice
    for key, row in before.items():  # what was stored before the kill was kept, not measured again
        assert after[key] == row
    runs = db.runs()
    assert len(runs) == 1 and runs[0]["status"] == "done"
    assert runs[0]["measured"] == len(expected)  # the run's books come from the database
    assert all(row[2] == runs[0]["id"] for row in after.values())
    assert f"{len(expected)} measured, 0 reused" in out


def test_unreachable_ray_address_fails_before_any_work(tmp_path):
    url = f"sqlite:///{tmp_path / 'latency.db'}"
    r = subprocess.run([*PROFILE, "--db", url, "--ray-address", "127.0.0.1:1"], capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert r.returncode != 0
    assert "cannot reach a Ray cluster at 127.0.0.1:1" in r.stderr
    assert len([line for line in r.stderr.strip().splitlines() if line.strip()]) == 1
    assert not (tmp_path / "latency.db").exists()  # nothing was written


def test_tp2_profile_on_ray_measures_collectives_in_their_own_group(tmp_path):
    """A TP=2 run on Ray: rank ops on single-core workers, the collectives in one shard that asks
    Ray for both cores and starts its real 2-process group inside the task."""
    from dooly.engine_interface import get_engine
    from dooly.profile import current_environment, default_threads

    version = get_engine("vllm").version

    url = f"sqlite:///{tmp_path / 'latency.db'}"
    r = subprocess.run([*PROFILE, "--tp", "2", "--db", url, "--ray-address", "local"], capture_output=True,
                       text=True, env=ENV, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    db = LatencyDB(url, create=False)
    env = current_environment("vllm", version(), "bfloat16", default_threads(2), 2)
    listing = db.listing(env.key)
    ops = {row["op"] for row in listing}
    assert {"_C::shm_allreduce", "_C::shm_all_gather"} <= ops
    (run,) = db.runs()
    assert run["status"] == "done" and run["measured"] == sum(row["points"] for row in listing)


def test_a_task_no_node_can_hold_is_refused_before_any_work():
    """Ray would queue such a task forever; dooly names the shortfall instead (real local instance)."""
    from dooly.cluster import ray_session, usable_cores
    from dooly.errors import DoolyError
    from dooly.profile.distributed import _check_fits

    with ray_session("local") as ray:
        _check_fits(ray, [{"num_cpus": 1}, {"num_cpus": usable_cores()}])  # fits: no error
        with pytest.raises(DoolyError, match=f"needs {usable_cores() + 1} CPUs on one node"):
            _check_fits(ray, [{"num_cpus": 1}, {"num_cpus": usable_cores() + 1}])
