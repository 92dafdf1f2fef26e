"""Shared, expensive fixtures: traces and one real engine per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_llama():
    from dooly.catalog import resolve

    return resolve("dooly/tiny-llama")


@pytest.fixture(scope="session")
def tiny_llama_trace(tiny_llama):
    from dooly.trace import trace_model

    return trace_model(tiny_llama, engine="vllm")


@pytest.fixture(scope="session")
def tiny_llama_engine(tiny_llama):
    """A real in-process vLLM engine (V1, CPU, eager, dummy weights) on the tiny Llama."""
    from dooly.engines.vllm.engine import running_engine

    with running_engine(tiny_llama.config) as llm:
        yield llm


@pytest.fixture(scope="session")
def profiled(tmp_path_factory, tiny_llama_trace):
    """The tiny Llama profiled (reduced grid, small limits) into a fresh SQLite database."""
    from dooly.db import LatencyDB
    from dooly.engine_interface import get_engine
    from dooly.profile import Limits, current_environment, default_threads, plan_profile, run_profile

    version = get_engine("vllm").version

    db = LatencyDB(f"sqlite:///{tmp_path_factory.mktemp('pred') / 'latency.db'}")
    env = current_environment("vllm", version(), "bfloat16", default_threads())
    plan = plan_profile([tiny_llama_trace], env, {}, "reduced", Limits(128, 8))
    summary = run_profile(plan, db)
    assert not summary.failed
    return db, env


@pytest.fixture
def profiled_copy(profiled, tmp_path):
    """A private copy of the profiled database, to change freely (SQLite's backup API: pages still in
    the write-ahead log come along), with its environment."""
    import sqlite3

    from dooly.db import LatencyDB

    db, env = profiled
    path = tmp_path / "copy.db"
    src, dst = sqlite3.connect(db.url.split(":///", 1)[1]), sqlite3.connect(path)
    with dst:
        src.backup(dst)
    src.close()
    dst.close()
    return LatencyDB(f"sqlite:///{path}", create=False), env


@pytest.fixture
def pg_url():
    """The test PostgreSQL server (scripts/postgres.sh), emptied: required in CI, skipped elsewhere without it."""
    from dooly.db import LatencyDB
    from dooly.db.schema import metadata
    from dooly.errors import DoolyError

    url = os.environ.get("DOOLY_TEST_PG_URL", "postgresql+psycopg://dooly:dooly@127.0.0.1:5432/dooly_test")
    try:
        db = LatencyDB(url)
    except DoolyError:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is required in CI (scripts/postgres.sh starts it)")
        pytest.skip("no local PostgreSQL server (run scripts/postgres.sh to start one)")
    metadata.drop_all(db.engine)  # a clean database for every test
    db.engine.dispose()
    yield url
