"""`dooly search` / `dooly capacity`: SLO and grid parsing, the rate search, its exact shortcuts
(early stop, simulation reuse), Ray fan-out = in-process, missing data, CLI exit codes and errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest

from dooly.errors import DoolyError

MODEL = "dooly/tiny-llama"
WORKLOAD = "n=40,prompt=uniform:16:120,output=uniform:4:24,seed=1"
GRID = ["max_num_seqs=4,8", "max_num_batched_tokens=64,128"]  # within the fixture's Limits(128, 8) profile
SLO = "ttft_p99=150ms,tpot_p99=20ms"
PRESSURE = "n=30,prompt=uniform:100:250,output=uniform:20:60,seed=1"  # outgrows 10 KV blocks: preemptions
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dooly.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


# -- SLO and grid parsing ---------------------------------------------------------------------------

def test_parse_slo():
    from dooly.search import parse_slo

    slo = parse_slo("ttft_p99=500ms, tpot_p99=50ms,e2e_mean=2s,itl_p50=1.5e1ms")
    assert [(t.metric, t.stat) for t in slo.targets] == [("ttft", "p99"), ("tpot", "p99"), ("e2e", "mean"),
                                                          ("itl", "p50")]
    assert [t.seconds for t in slo.targets] == pytest.approx([0.5, 0.05, 2.0, 0.015])  # 1.5e1 ms = 0.015 s
    assert slo.targets[0].percentile == 99 and slo.targets[2].percentile is None


@pytest.mark.parametrize("text, names", [
    ("", "empty SLO"),
    ("ttft_p99", "'ttft_p99'"),
    ("ttft_p99=1s,foo_p99=1s", "'foo_p99=1s'"),
    ("ttft_p95=1s", "'ttft_p95=1s'"),
    ("ttft_p99=5", "'ttft_p99=5'"),
    ("ttft_p99=5min", "'ttft_p99=5min'"),
    ("ttft_p99=0ms", "'ttft_p99=0ms'"),
    ("ttft_p99=1s,ttft_p99=2s", "given twice"),
    ("ttft_p99=1s,,tpot_p99=1s", "empty part"),
])
def test_parse_slo_rejects_bad_parts(text, names):
    from dooly.search import parse_slo

    with pytest.raises(DoolyError) as e:
        parse_slo(text)
    assert names in str(e.value) and "\n" not in str(e.value)


def test_parse_grid_and_configurations():
    from dooly.search.grid import configurations, parse_grid

    grid = parse_grid(["max-num-seqs=4,8", "enable_chunked_prefill=true,false", "dtype=bfloat16"])
    assert grid == {"max_num_seqs": (4, 8), "enable_chunked_prefill": (True, False), "dtype": ("bfloat16",)}
    configs = configurations([MODEL], grid)
    assert len(configs) == 4 and len({c.key for c in configs}) == 4
    assert configs[1].key == f"{MODEL} max_num_seqs=4 enable_chunked_prefill=false"  # defaults left out


@pytest.mark.parametrize("items, names", [
    (["max_num_seqs=4,x"], "max_num_seqs=x"),
    (["max_num_seqs=0"], "max_num_seqs=0"),
    (["enable_prefix_caching=yes"], "enable_prefix_caching=yes"),
    (["num_gpu_blocks=10"], "'num_gpu_blocks'"),
    (["dtype=int3"], "dtype=int3"),
    (["attention_backend=NO_SUCH_BACKEND"], "attention_backend=NO_SUCH_BACKEND"),
    (["max_num_seqs=4,4"], "repeated"),
    (["max_num_seqs=4", "max-num-seqs=8"], "twice"),
])
def test_parse_grid_rejects_bad_values(items, names):
    from dooly.search import parse_grid

    with pytest.raises(DoolyError) as e:
        parse_grid(items)
    assert names in str(e.value) and "\n" not in str(e.value)


def test_tensor_parallel_size_must_divide_the_heads():
    from dooly.search.grid import configurations, parse_grid

    with pytest.raises(DoolyError, match="tensor_parallel_size=3: it does not divide num_attention_heads=8"):
        configurations([MODEL], parse_grid(["tensor_parallel_size=1,3"]))


# -- pieces of the search ---------------------------------------------------------------------------

def _simulation(profiled, **kw):
    """A finished simulation of WORKLOAD (Poisson at 20/s) with a fresh FastScheduler."""
    from dooly.api import parse_workload
    from dooly.catalog import resolve
    from dooly.predict import Predictor, StepPredictor
    from dooly.sim import simulate
    from dooly.sim.scheduler import FastScheduler
    from dooly.trace import trace_model

    db, env = profiled
    spec = resolve(MODEL)
    step = StepPredictor(trace_model(spec, cache=True), Predictor(db, env))
    requests = parse_workload(WORKLOAD.replace("seed=1", "arrivals=poisson:20,seed=1"))
    sched = FastScheduler(spec.config, max_num_seqs=8, max_num_batched_tokens=128, **kw)
    return simulate(requests, sched, lambda b: step(b).us / 1e6, spec.config["vocab_size"])


def test_slo_statistics_are_the_summary_s(profiled):
    from dooly.search import parse_slo
    from dooly.search.slo import evaluate
    from dooly.sim.metrics import summary

    results, _ = _simulation(profiled)
    table = summary(results).set_index("metric")
    slo = parse_slo("ttft_p99=1s,tpot_p90=1s,itl_p50=1s,e2e_mean=1s")
    met, stats = evaluate(slo, results)
    assert met
    for t in slo.targets:
        assert stats[t.name] == pytest.approx(table.loc[f"{t.metric}_s", t.stat], rel=1e-12)


def test_fresh_copy_runs_like_a_new_scheduler(profiled):
    """A copied template schedules exactly like a scheduler built anew, and stays unused itself."""
    from dooly.api import parse_workload
    from dooly.catalog import resolve
    from dooly.search.sweep import fresh_copy
    from dooly.sim import simulate
    from dooly.sim.scheduler import FastScheduler

    spec = resolve(MODEL)
    requests = parse_workload(PRESSURE.replace("seed=1", "arrivals=burst,seed=1"))
    kw = {"max_num_seqs": 8, "max_num_batched_tokens": 128, "num_blocks": 10}  # 10 KV blocks of 128 tokens

    def steps(sched):
        _, out = simulate(requests, sched, lambda b: 1e-3 + 1e-5 * b.num_tokens, spec.config["vocab_size"])
        return [(s.req_ids, s.batch, s.preempted) for s in out]

    template = FastScheduler(spec.config, **kw)
    reference = steps(FastScheduler(spec.config, **kw))
    assert any(p for _, _, p in reference)  # the small KV cache does preempt
    assert steps(fresh_copy(template)) == reference
    assert steps(fresh_copy(template)) == reference  # the template was not touched by the first run


def test_pareto_front():
    from dooly.search.plots import pareto_front

    # (latency, goodput per device, index): 1 beats 0 (faster, same goodput), 3 is beaten by 2
    points = [(5.0, 10.0, 0), (4.0, 10.0, 1), (6.0, 20.0, 2), (7.0, 15.0, 3), (8.0, 25.0, 4)]
    assert pareto_front(points) == [1, 2, 4]


def test_plan_capacity_arithmetic():
    from dooly.search import Sweep, parse_slo
    from dooly.search.core import SearchResult, _configs_frame, plan_capacity

    slo = parse_slo("ttft_p99=1s")
    rows = [{"config": "a", "model": "m", "tensor_parallel_size": 2, "status": "ok", "goodput_rps": 12.5,
             "goodput_per_device_rps": 6.25, "ttft_p99_s": 0.5},
            {"config": "b", "model": "m", "tensor_parallel_size": 1, "status": "ok", "goodput_rps": 5.0,
             "goodput_per_device_rps": 5.0, "ttft_p99_s": 0.4}]
    res = SearchResult(_configs_frame(rows, slo), pd.DataFrame(), slo, Sweep(), "in-process", 0.0, 0)
    plan = plan_capacity(res, 30.0).iloc[0]
    assert plan["config"] == "a"  # 6.25 requests/s per device beats 5.0
    assert plan["replicas"] == 3  # ceil(30 / 12.5)
    assert plan["devices"] == 6  # 3 replicas x tp 2
    assert plan["margin"] == pytest.approx(0.25)  # 3 x 12.5 / 30 - 1
    none = SearchResult(_configs_frame([{**rows[0], "status": "infeasible"}], slo), pd.DataFrame(), slo, Sweep(),
                        "in-process", 0.0, 0)
    assert plan_capacity(none, 30.0) is None


# -- whole searches ---------------------------------------------------------------------------------

def _search(profiled, grid=GRID, slo=SLO, workload=WORKLOAD, **kw):
    from dooly.search import search

    db, _ = profiled
    return search(kw.pop("models", MODEL), workload, slo, grid, db=db.url, **kw)


def _check_bracketed(res):
    """Each configuration with a goodput met the SLO there and missed it at the next grid rate."""
    rates = list(res.sweep.rates())
    for _, row in res.configs[res.configs["status"] == "ok"].iterrows():
        tried = res.rates[res.rates["config"] == row["config"]].set_index("rate_rps")["met"]
        above = rates[rates.index(row["goodput_rps"]) + 1]
        assert tried[row["goodput_rps"]] and not tried[above]


def test_ray_search_equals_in_process_and_lists_missing_data(profiled):
    """2x2 grid on two models, one of them absent from the database: a local Ray instance and this
    process give equal frames; the absent model's configurations are listed with the command."""
    import ray

    db, _ = profiled
    models = [MODEL, "dooly/tiny-qwen2"]
    local = _search(profiled, models=models, use_ray=False)
    assert not ray.is_initialized()
    on_ray = _search(profiled, models=models, use_ray=True)
    assert not ray.is_initialized()  # the instance it started is shut down
    assert on_ray.ran_on.startswith("ray") and local.ran_on == "in-process"
    pd.testing.assert_frame_equal(on_ray.configs, local.configs)
    pd.testing.assert_frame_equal(on_ray.rates, local.rates)
    cfg = local.configs
    assert len(cfg) == 8
    ours = cfg[cfg["model"] == MODEL]
    assert (ours["status"] == "ok").all()
    assert (ours["goodput_per_device_rps"] > 0).all() and (ours["simulations"] > 1).all()
    _check_bracketed(local)
    missing = cfg[cfg["model"] == "dooly/tiny-qwen2"]
    assert (missing["status"] == "missing").all() and len(missing) == 4
    assert set(missing["reason"]) == {f"dooly profile dooly/tiny-qwen2 --db {db.url}"}
    order = cfg["goodput_per_device_rps"].to_numpy()
    assert (order[:-1] >= order[1:]).all()  # best first


def test_early_stop_and_reuse_change_no_outcome(profiled):
    """Early stop ends violated runs (it does here) with the same verdicts; reusing a simulation for
    the configurations it provably describes gives identical frames, with and without KV pressure."""
    grid = GRID + ["enable_prefix_caching=true,false", "enable_chunked_prefill=true"]
    plain = _search(profiled, grid, use_ray=False, early_stop=False, reuse=False)
    fast = _search(profiled, grid, use_ray=False)
    assert fast.rates["stopped_early"].any() and fast.simulated < len(fast.rates)
    cols = ["config", "status", "goodput_rps", "simulations"]
    pd.testing.assert_frame_equal(fast.configs[cols], plain.configs[cols])
    pd.testing.assert_frame_equal(fast.rates[["config", "rate_rps", "met"]], plain.rates[["config", "rate_rps", "met"]])
    done = ~fast.rates["stopped_early"]
    pd.testing.assert_frame_equal(fast.rates[done], plain.rates[done])
    roomy = _search(profiled, grid, workload=PRESSURE, use_ray=False)
    small = grid + ["kv_cache_gib=0.005"]  # 10 KV blocks: preemptions
    pressed = [_search(profiled, small, workload=PRESSURE, use_ray=False, reuse=r) for r in (True, False)]
    pd.testing.assert_frame_equal(pressed[0].configs, pressed[1].configs)
    pd.testing.assert_frame_equal(pressed[0].rates, pressed[1].rates)
    outcome = ["rate_rps", "met", "stopped_early"]  # (the configurations' names differ by the kv option)
    assert not pressed[0].rates[outcome].equals(roomy.rates[outcome])  # the pressure did change the simulations


def test_capacity_api(profiled):
    from dooly.api import capacity

    db, _ = profiled
    plan, res = capacity(MODEL, 100.0, WORKLOAD, SLO, GRID, db=db.url, use_ray=False)
    p, best = plan.iloc[0], res.best
    assert p["config"] == best["config"]
    assert p["replicas"] == math.ceil(100.0 / best["goodput_rps"])
    assert p["devices"] == p["replicas"] * best["tensor_parallel_size"]
    assert p["margin"] == pytest.approx(p["replicas"] * best["goodput_rps"] / 100.0 - 1)


# -- the command line -------------------------------------------------------------------------------

def test_cli_exit_codes_and_outputs(profiled, tmp_path):
    db, _ = profiled
    common = [MODEL, "--workload", WORKLOAD, "--grid", GRID[0], "--db", db.url, "--no-ray"]
    r = _cli("search", *common, "--slo", "ttft_p99=0.001ms", "--json")
    assert r.returncode == 3, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert doc["best"] is None and {c["status"] for c in doc["configs"]} == {"infeasible"}
    r = _cli("search", *common, "--slo", SLO, "--json", "--out", str(tmp_path), "--plot")
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert doc["best"] == doc["configs"][0]["config"] and doc["configs"][0]["status"] == "ok"
    for name in ("configs.csv", "rates.csv", "search.json", "pareto.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert len(pd.read_csv(tmp_path / "configs.csv")) == 2
    r = _cli("capacity", *common, "--slo", SLO, "--rate", "50", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads(r.stdout)
    assert plan["replicas"] == math.ceil(50 / plan["goodput_rps"]) and plan["devices"] == plan["replicas"]
    r = _cli("capacity", *common, "--slo", "ttft_p99=0.001ms", "--rate", "50", "--json")
    assert r.returncode == 3, r.stderr[-2000:]  # every configuration had its data: the verdict stands
    assert json.loads(r.stdout)["plan"] is None and r.stderr.startswith("error: no configuration of")


@pytest.mark.parametrize("extra, names", [
    (["--grid", "max_num_seqs=4,x"], "max_num_seqs=x"),
    (["--grid", "max_num_batched_tokens=128", "--grid", "enable_chunked_prefill=false"],
     "max_num_batched_tokens=128: vLLM rejects every configuration"),
    (["--ray-address", "127.0.0.1:1"], "cannot reach a Ray cluster at 127.0.0.1:1"),
    (["--slo", "ttft_p95=1s"], "'ttft_p95=1s'"),
])
def test_cli_fails_in_one_line_before_work(profiled, tmp_path, extra, names):
    db, _ = profiled
    args = ["search", MODEL, "--workload", WORKLOAD, "--db", db.url, "--out", str(tmp_path / "out")]
    if "--slo" not in extra:
        args += ["--slo", SLO]
    r = _cli(*args, *extra)
    lines = [line for line in r.stderr.splitlines() if line.strip() and "Triton" not in line]
    assert r.returncode == 2 and len(lines) == 1 and names in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written
