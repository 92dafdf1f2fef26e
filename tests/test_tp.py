"""Tensor parallelism on the real engine: vLLM's CPU build at TP=2 (two worker processes, shared-memory
collectives), compared with dooly's rank trace."""

from __future__ import annotations

import json

import pytest

from dooly.trace.instantiate import tensor_shapes


@pytest.fixture(scope="module")
def tp2_engine(tiny_llama):
    import os

    from dooly.engines.vllm.engine import running_engine

    before = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    with running_engine(tiny_llama.config, tensor_parallel_size=2) as llm:
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"].count("|") == 1  # one core set per worker
        yield llm
    # regression: the binding stays no longer than its engine (a later engine of another TP binds its own)
    assert os.environ.get("VLLM_CPU_OMP_THREADS_BIND") == before


@pytest.fixture(scope="module")
def tp2_trace(tiny_llama):
    from dooly.trace import trace_model

    return trace_model(tiny_llama, engine="vllm", tensor_parallel_size=2)


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
    from dooly.engine_interface import get_engine
    from dooly.profile import Limits, current_environment, default_threads, plan_profile, run_profile

    version = get_engine("vllm").version

    db = LatencyDB(f"sqlite:///{tmp_path_factory.mktemp('tp2') / 'latency.db'}")
    env = current_environment("vllm", version(), "bfloat16", default_threads(2), 2)
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
    # met: "ok", or "capped" where this machine is fast enough to meet it even at the top rate tried
    assert by_tp.loc[2, "status"] in ("ok", "capped") and by_tp.loc[2, "goodput_rps"] > 0
    assert by_tp.loc[2, "goodput_per_device_rps"] == pytest.approx(by_tp.loc[2, "goodput_rps"] / 2)
    assert by_tp.loc[1, "status"] == "missing"
    assert "dooly profile dooly/tiny-llama" in by_tp.loc[1, "reason"] and "--tp" not in by_tp.loc[1, "reason"]


def test_vidur_export_at_tp2_describes_one_worker_and_its_all_reduces(profiled_tp2, tp2_trace, tmp_path):
    """`dooly export vidur --tensor-parallel-size 2`: rows keyed by the full model and 2 workers, one
    rank's sharded ops, all_reduce.csv in the network dataset; a whole TP=2 step is conserved."""
    import pandas as pd

    from dooly.export import export_vidur
    from dooly.export.vidur import num_tokens_points
    from dooly.predict import Predictor, predict_step
    from dooly.records import Batch
    from dooly.records import FREE, classify

    db, env = profiled_tp2
    res = export_vidur("dooly/tiny-llama", tmp_path / "export", db=db.url, max_num_batched_tokens=128,
                       max_num_seqs=8, tensor_parallel_size=2)
    mlp, att, ar = res.mlp.set_index("num_tokens"), res.attention, res.all_reduce
    assert (res.mlp["num_tensor_parallel_workers"] == 2).all() and (res.mlp["n_head"] == 8).all()
    assert (att["num_tensor_parallel_workers"] == 2).all() and (att["n_kv_head"] == 4).all()
    # Vidur keeps rows with num_workers == devices_per_node == TP and reads size / n_embd / 2 as tokens
    assert (
        (ar["num_workers"] == 2).all()
        and (ar["devices_per_node"] == 2).all()
        and (ar["collective"] == "all_reduce").all()
    )
    assert (ar["size"] / 512 / 2).tolist() == num_tokens_points(128)
    v = res.manifest["vidur"]
    net_repo = res.folder / "profiling_data" / "network" / f"datasets--{v['network_dataset'].replace('/', '--')}"
    net = net_repo / "snapshots" / (net_repo / "refs" / "main").read_text()
    assert pd.read_csv(net / "all_reduce.csv.xz").equals(
        pd.read_csv(res.folder / "data/profiling/network/cpu/all_reduce.csv")
    )
    args = dict(zip(v["args"][::2], v["args"][1::2]))
    assert args["--replica_config_tensor_parallel_size"] == "2"
    assert args["--random_forrest_execution_time_predictor_config_nccl_cpu_launch_overhead_ms"] == "0"

    pred = Predictor(db, env)
    reduce_sig = next(o.signature for o in tp2_trace.ops if o.op == "_C::shm_allreduce")
    assert ar.set_index(ar["size"] // 1024)["time_stats.all_reduce.median"].loc[64] == \
        pytest.approx(pred.latency(reduce_sig, {"num_tokens": 64}).us / 1e3, rel=1e-9)
    # a 128-token prefill step of one rank: 4 layers x (Vidur's per-layer ops + 2 all-reduces) + the
    # embedding + what Vidur has no place for (final norm, logits, their all-gather) = dooly's TP=2 step
    first_chunk = att[(att["prefill_chunk_size"] == 128) & (att["kv_cache_size"] == 0)].iloc[0]
    ops = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj", "mlp_act", "input_layernorm",
           "post_attention_layernorm", "attn_rope", "add")
    per_layer = (
        sum(mlp.loc[128, f"time_stats.{c}.median"] for c in ops)
        + first_chunk["time_stats.attn_prefill.median"]
        + first_chunk["time_stats.attn_kv_cache_save.median"]
        + 2 * ar.set_index("size").loc[2 * 128 * 512, "time_stats.all_reduce.median"]
    )
    outside = sum(pred.latency(o.signature, {"num_tokens": 128, "num_reqs": 1}).us for o in tp2_trace.ops
                  if o.module.startswith(("model.norm", "logits_processor")) and classify(o.op, o.attrs) != FREE) / 1e3
    step = predict_step(tp2_trace, pred, Batch((0,), (128,)), overhead=False).us / 1e3
    assert 4 * per_layer + mlp.loc[128, "time_stats.emb.median"] + outside == pytest.approx(step, rel=1e-9)
    names = {(x["module"], x["op"]) for x in res.manifest["not_represented"]}
    assert ("logits_processor", "_C::shm_all_gather") in names
