"""`dooly validate` on the real engine (the session's tiny-Llama engine) and the profiled database."""

from __future__ import annotations

import subprocess
import sys

import pytest

BURST = "n=3,prompt=uniform:20:120,output=6,arrivals=burst,seed=4"
SPREAD = "n=4,prompt=uniform:20:120,output=5,arrivals=poisson:30,seed=5"


@pytest.fixture(scope="module")
def validated(profiled, tiny_llama_engine):
    from dooly.validate import validate

    db, _ = profiled
    return validate("dooly/tiny-llama", [BURST, SPREAD], db=db.url, repeats=2, llm=tiny_llama_engine, split_ops=True)


def test_ground_truth_is_what_the_engine_served(validated):
    from dooly.api import parse_workload

    for v in validated:
        wanted = {r.request_id: r for r in parse_workload(v.workload)}
        assert len(v.measured) == 2
        for reqs, steps in v.measured:
            assert set(reqs["request_id"]) == set(wanted)
            # every request got exactly its output tokens, after it arrived
            assert (reqs["ttft_s"] > 0).all() and (reqs["e2e_s"] >= reqs["ttft_s"]).all()
            for _, r in reqs.iterrows():
                assert r["finish_s"] >= wanted[r["request_id"]].arrival_s
            # the steps' tokens add up to every prompt plus every output token but the last
            total = sum(w.prompt_tokens + w.output_tokens - 1 for w in wanted.values())
            assert steps["num_tokens"].sum() == total
        assert len(v.steps) == sum(len(s) for _, s in v.measured)


def test_comparison_figures(validated):
    burst = validated[0]
    # all arrive at once: the simulator (vLLM's scheduler) must schedule exactly the engine's batches
    assert burst.match_rate == 1.0
    h = burst.headline()
    for key in ("ttft_mape", "tpot_mape", "p99_ttft_err", "step_mape", "spread_ttft"):
        assert h[key] == h[key] and h[key] >= 0, key  # a number, not NaN
    m = burst.metrics.set_index(["metric", "stat"])
    assert m.loc[("ttft_s", "mean"), "measured"] > 0 and m.loc[("ttft_s", "mean"), "predicted"] > 0
    row = m.loc[("ttft_s", "mean")]
    assert row["ape"] == pytest.approx(abs(row["predicted"] - row["measured"]) / row["measured"])
    assert set(burst.step_types["type"]) <= {"prefill", "decode", "mixed"}
    assert "decode" in set(burst.step_types["type"])


def test_bad_input_fails_before_the_engine(profiled, tmp_path):
    db, _ = profiled
    r = subprocess.run([sys.executable, "-m", "dooly.cli", "validate", "dooly/tiny-llama", "--workload",
                        "n=2,prompt=-5", "--db", db.url], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "prompt" in r.stderr and "Traceback" not in r.stderr
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    r = subprocess.run([sys.executable, "-m", "dooly.cli", "validate", "dooly/tiny-llama", "--workload", BURST,
                        "--db", empty], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "starting the engine" not in r.stderr


ENGINE_THREADS = """
import os, torch
from dooly.catalog import resolve
from dooly.engines.vllm.engine import start_engine, stop_engine
from dooly.profile import default_threads
if __name__ == "__main__":
    before = torch.get_num_threads()
    llm = start_engine(resolve("dooly/tiny-llama").config)
    print(before, torch.get_num_threads(), default_threads(1))
    stop_engine(llm)
"""


def test_engine_computes_with_the_databases_thread_count_whatever_the_shell_says():
    """Without OMP_NUM_THREADS the in-process worker would use every core, while the database holds
    one-rank measurements at default_threads(): the engine must be pinned to the latter."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    r = subprocess.run([sys.executable, "-c", ENGINE_THREADS], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    before, during, expected = map(int, r.stdout.split()[-3:])
    assert during == expected
    if os.cpu_count() > 1:
        assert before == os.cpu_count() != expected  # the case that went wrong: torch's default is every core


def test_an_engine_leaves_the_process_as_it_found_it(tiny_llama, tiny_llama_engine, monkeypatch):
    """Regression: an engine's KV space stayed in the environment (a later simulate in the process
    sized its KV cache at 1 GiB, not 4), its TP binding stayed for the next TP engine, and its thread
    count for everything after it."""
    import os

    import torch

    from dooly.deployment import Deployment, kv_blocks, scheduler_settings
    from dooly.engines.vllm.engine import ENGINE_ENV, running_engine

    for key in ENGINE_ENV:
        monkeypatch.delenv(key, raising=False)  # the session engine's own settings come back afterwards
    settings = scheduler_settings(tiny_llama.config, "bfloat16")
    before = Deployment.resolve(tiny_llama).num_blocks
    assert before == kv_blocks(settings, 4.0) == 4 * kv_blocks(settings, 1.0)  # the default KV space: 4 GiB
    threads = torch.get_num_threads()
    torch._C.set_num_threads(threads + 1)  # torch's own: the session's engine made torch.set_num_threads a no-op
    try:
        with running_engine(tiny_llama.config, kv_cache_gib=1, threads=1):
            assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1" and torch.get_num_threads() == 1
            # KV sizing is an argument: a simulation while (or after) an engine runs ignores its KV space
            assert Deployment.resolve(tiny_llama).num_blocks == before
        assert not any(key in os.environ for key in ENGINE_ENV)
        assert Deployment.resolve(tiny_llama).num_blocks == before and torch.get_num_threads() == threads + 1
        assert torch.set_num_threads is torch._C.set_num_threads  # works again after the engine
    finally:
        torch._C.set_num_threads(threads)


def test_drift_is_measured_around_every_run_and_corrected(validated, profiled, tiny_llama_trace):
    """Sentinels are re-timed before the first engine run and after each; the corrected simulation
    scales every step by their median, and a noise floor above the target marks a metric inconclusive."""
    from dooly.profile.sentinels import pick_sentinels, time_ratio

    db, env = profiled
    sentinels = pick_sentinels(tiny_llama_trace, db.points(env.key))
    assert 1 <= len(sentinels) <= 3 and len({s.signature for s in sentinels}) == len(sentinels)
    assert all(s.op != "aten::view" and 0 < s.stored_us <= 20_000 for s in sentinels)
    ratio = time_ratio(sentinels, "vllm", env.threads)
    assert 0.2 < ratio < 5  # the same method on the same machine: the same order of time
    for v in validated:
        h = v.headline()
        assert len(v.time_ratios) == 2 + 1 and all(0.2 < r < 5 for r in v.time_ratios)
        assert h["time_ratio_min"] <= h["time_ratio"] <= h["time_ratio_max"]
        for key in ("ttft_mape_corrected", "tpot_mape_corrected"):
            assert h[key] == h[key] and h[key] >= 0, key
        assert h["inconclusive_ttft"] == (h["spread_ttft"] > 0.05)
        assert v.headline(target=1e9)["inconclusive_ttft"] is False


def test_op_split_puts_each_family_in_engine_beside_its_prediction(validated):
    for v in validated:
        split = v.op_split
        assert set(split["type"]) == set(v.step_types["type"])
        for _, g in split.groupby("type"):
            fam = g.set_index("family")
            assert {"gemm", "attention", "kv_write", "elementwise", "ops", "overhead"} <= set(fam.index)
            parts = fam.drop(index=["ops", "overhead"])
            assert (parts["in_engine_ms"] > 0).all() and (parts["predicted_ms"] > 0).all()
            assert fam.loc["ops", "in_engine_ms"] == pytest.approx(parts["in_engine_ms"].sum())
            assert fam.loc["ops", "predicted_ms"] == pytest.approx(parts["predicted_ms"].sum())
            signed = (fam["predicted_ms"] - fam["in_engine_ms"]) / fam["in_engine_ms"]
            assert signed.to_numpy() == pytest.approx(fam["signed_err"].to_numpy(), nan_ok=True)
