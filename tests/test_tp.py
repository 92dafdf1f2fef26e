"""Tensor parallelism on the real engine: vLLM's CPU build at TP=2 (two worker processes, shared-memory
collectives), compared with dooly's rank trace."""

from __future__ import annotations

import json

import pytest

from dooly.trace.instantiate import tensor_shapes


@pytest.fixture(scope="module")
def tp2_engine(tiny_llama):
    from dooly.engines.vllm.engine import start_engine

    llm = start_engine(tiny_llama.config, tensor_parallel_size=2)
    yield llm
    del llm


@pytest.fixture(scope="module")
def tp2_trace(tiny_llama):
    from dooly.trace import trace_model

    return trace_model(tiny_llama, engine="vllm", tp=2)


def _plain(view):
    return json.loads(json.dumps(view))  # tuples and lists alike, as the workers' replies are


def _traced_view(trace, values):
    vals = {**trace.config_params, **values}
    out = []
    for o in trace.ops:
        shapes = tensor_shapes(tuple(a for a in o.args if a.kind == "tensor"), vals)
        shapes += tensor_shapes(tuple(a for a in o.args if a.kind == "tensors"), vals)
        out.append((o.op, o.module, shapes, [a.dtype for a in o.args if a.kind == "tensor"]))
    return _plain(out)


def test_rank_trace_equals_both_real_ranks(tp2_engine, tp2_trace):
    from vllm import SamplingParams

    from dooly.engines.vllm.engine import record_all_ranks

    eng = tp2_engine.llm_engine
    sp = SamplingParams(max_tokens=3, min_tokens=3, ignore_eos=True, temperature=0)
    eng.add_request("a", {"prompt_token_ids": list(range(1, 21))}, sp)
    eng.step()  # a's 20-token prefill
    eng.add_request("b", {"prompt_token_ids": list(range(1, 31))}, sp)
    with record_all_ranks(tp2_engine) as ranks:
        eng.step()  # a's decode + b's 30-token prefill: 31 tokens, 2 requests
    while eng.has_unfinished_requests():
        eng.step()
    assert len(ranks) == 2
    traced = _traced_view(tp2_trace, {"num_tokens": 31, "num_reqs": 2})
    assert any(op.startswith("_C::shm_") for op, *_ in traced), "the rank trace has the shm collectives"
    for rank, steps in enumerate(ranks):
        real = _plain(steps[0])
        assert len(real) == len(traced), f"rank {rank}: {len(real)} ops, traced {len(traced)}"
        for i, (t, r) in enumerate(zip(traced, real)):
            assert t == r, f"rank {rank} op {i}: traced {t} != engine {r}"


@pytest.fixture(scope="module")
def profiled_tp2(tmp_path_factory, tp2_trace):
    """The tiny Llama's TP=2 rank ops and collectives (real 2-process shm group) in a fresh database."""
    from dooly.db import LatencyDB
    from dooly.engines.vllm import version
    from dooly.profile import Limits, current_environment, default_threads, plan_profile, run_profile

    db = LatencyDB(f"sqlite:///{tmp_path_factory.mktemp('tp2') / 'latency.db'}")
    env = current_environment("vllm", version(), "bfloat16", default_threads(2), tp=2)
    plan = plan_profile([tp2_trace], env, {}, "reduced", Limits(128, 8))
    summary = run_profile(plan, db)
    assert not summary.failed
    return db, env


def test_validate_at_tp2(profiled_tp2, tp2_engine):
    from dooly.validate import validate

    db, _ = profiled_tp2
    [v] = validate("dooly/tiny-llama", ["n=3,prompt=uniform:20:120,output=6,arrivals=burst,seed=4"], db=db.url,
                   repeats=1, llm=tp2_engine, tensor_parallel_size=2)
    assert v.match_rate == 1.0  # the simulator scheduled exactly the TP=2 engine's batches
    assert (v.steps["pred_collective_s"] > 0).all()  # every step pays its all-reduces
    reqs, _ = v.measured[0]
    assert (reqs["ttft_s"] > 0).all() and len(reqs) == 3
    assert v.headline()["ttft_mape"] == v.headline()["ttft_mape"]  # a number


def test_search_over_tp_degrees_uses_the_tp_data_it_has(profiled_tp2):
    """A grid over tensor_parallel_size: TP=2 is answered from its rank ops + collectives, goodput per
    device is halved; TP=1 (absent from this database) is listed with the command that fills it."""
    from dooly.search import search

    db, _ = profiled_tp2
    res = search(["dooly/tiny-llama"], "n=30,prompt=uniform:16:120,output=uniform:4:24,seed=1",
                 "ttft_p99=150ms,tpot_p99=20ms", ["tensor_parallel_size=1,2", "max_num_seqs=8",
                                                  "max_num_batched_tokens=128"], db=db.url, use_ray=False)
    by_tp = res.configs.set_index("tensor_parallel_size")
    assert by_tp.loc[2, "status"] == "ok" and by_tp.loc[2, "goodput_rps"] > 0
    assert by_tp.loc[2, "goodput_per_device_rps"] == pytest.approx(by_tp.loc[2, "goodput_rps"] / 2)
    assert by_tp.loc[1, "status"] == "missing"
    assert "dooly profile dooly/tiny-llama" in by_tp.loc[1, "reason"] and "--tp" not in by_tp.loc[1, "reason"]
