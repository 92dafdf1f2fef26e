"""The KV-cache dtype as a configuration axis: an FP8 KV cache traced, profiled through the engine's own
attention set-up, simulated with the blocks the engine gives it, and served by the real engine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dooly.errors import DoolyError

MODEL = "dooly/tiny-llama"


@pytest.fixture(scope="module")
def fp8_trace():
    from dooly.catalog import resolve
    from dooly.trace import trace_model

    return trace_model(resolve(MODEL), kv_cache_dtype="fp8")


def test_fp8_kv_changes_only_the_attention_and_kv_write_signatures(fp8_trace, tiny_llama_trace):
    base, fp8 = tiny_llama_trace, fp8_trace
    assert [o.op for o in fp8.ops] == [o.op for o in base.ops]  # the same step, op for op
    changed = {o.op for o, b in zip(fp8.ops, base.ops) if o.signature != b.signature}
    assert changed == {"vllm::unified_attention_with_output", "vllm::unified_kv_cache_update"}
    for o in fp8.ops:
        if o.op in changed:
            assert dict(o.attrs)["kv_cache_dtype"] == "fp8"
    assert fp8.unresolved == 0  # labelled like any other trace


def test_fp8_kv_gives_twice_the_blocks_as_the_engine_computes_them():
    from dooly.deployment import Deployment
    from dooly.records import DEFAULT_OPTIONS

    auto = Deployment.resolve(MODEL)
    fp8 = Deployment.resolve(MODEL, options=DEFAULT_OPTIONS.replace(kv_cache_dtype="fp8"))
    assert fp8.settings["kv_bytes_per_block"] * 2 == auto.settings["kv_bytes_per_block"]
    assert fp8.num_blocks == pytest.approx(2 * auto.num_blocks, abs=1)
    assert fp8.engine_kwargs()["kv_cache_dtype"] == "fp8" and "kv_cache_dtype" not in auto.engine_kwargs()


def test_fp8_kv_profiled_simulated_and_served(profiled_copy, fp8_trace):
    from dooly.profile import Limits, plan_profile, run_profile
    from dooly.api import simulate
    from dooly.validate import validate

    db, env = profiled_copy
    plan = plan_profile([fp8_trace], env, db.points(env.key), "reduced", Limits(128, 8))
    # the bf16 database already holds every other op: only the two FP8 attention ops are measured
    assert {w.op for w in plan.work if any((w.signature, p) not in plan.stored for p in w.points)} == \
        {"vllm::unified_attention_with_output", "vllm::unified_kv_cache_update"}
    assert not run_profile(plan, db).failed
    workload = "n=3,prompt=uniform:20:100,output=4,arrivals=burst,seed=2"
    sims = {k: simulate(MODEL, workload, db=db.url, kv_cache_dtype=k) for k in ("auto", "fp8")}
    assert all(len(s.requests) == 3 for s in sims.values())
    # the real engine serves it too (a fresh one: the session engine's KV cache is bf16)
    [v] = validate(MODEL, [workload], db=db.url, repeats=1, kv_cache_dtype="fp8", max_num_batched_tokens=128,
                   max_num_seqs=8)
    assert len(v.measured) == 1 and len(v.measured[0][0]) == 3 and v.match_rate == 1.0


def test_a_head_size_the_fp8_kernels_lack_is_one_line(tmp_path):
    from dooly.catalog import resolve
    from dooly.trace import trace_model

    config = dict(resolve(MODEL).config, hidden_size=640, num_attention_heads=8, num_key_value_heads=4)  # head 80
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = resolve(str(tmp_path / "config.json"))
    trace_model(spec)  # bf16 KV: fine
    with pytest.raises(DoolyError, match=r"head_size=80.*FP8 KV cache requires head_size divisible by 32"):
        trace_model(spec, kv_cache_dtype="fp8")


def test_unknown_kv_cache_dtype_is_one_line_and_writes_nothing(profiled_copy, tmp_path):
    from dooly.search import parse_grid

    db, env = profiled_copy
    before = db.points(env.key)
    for args in (["trace", MODEL], ["profile", MODEL, "--db", db.url], ["simulate", MODEL, "--workload",
                 "n=2,prompt=8,output=2", "--db", db.url, "--out", str(tmp_path / "out")]):
        r = subprocess.run([sys.executable, "-m", "dooly.cli", *args, "--kv-cache-dtype", "fp9"],
                           capture_output=True, text=True)
        lines = [line for line in r.stderr.splitlines() if line.strip() and "Triton" not in line]
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
        assert "unknown --kv-cache-dtype 'fp9'" in lines[0] and "fp8" in lines[0]
    assert db.points(env.key) == before and not (tmp_path / "out").exists()
    with pytest.raises(DoolyError, match="kv_cache_dtype=fp9: the engine offers auto, fp8"):
        parse_grid(["kv_cache_dtype=auto,fp9"])
    assert parse_grid(["kv_cache_dtype=auto,fp8"]) == {"kv_cache_dtype": ("auto", "fp8")}


def test_engine_weights_have_a_checkpoints_scale(tiny_llama_engine, tiny_llama):
    """vLLM's dummy weights (+-1e-3, norms included) shrink keys to ~1e-6, where an FP8 KV write takes a
    slow path no real model takes; the engines dooly starts draw weights at the config's scale."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from dooly.engine_interface import get_engine
    from dooly.engines.vllm.engine import _model_methods, model_runner
    from dooly.trace.recorder import op_name
    from dooly.workload import parse_workload

    keys = []

    class Keys(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if op_name(func) == "vllm::unified_kv_cache_update":
                keys.append(float(args[0].float().abs().mean()))
            return func(*args, **(kwargs or {}))

    model = model_runner(tiny_llama_engine).model
    forward = model.forward

    def watched(*args, **kwargs):
        with Keys():
            return forward(*args, **kwargs)

    with _model_methods(model, watched, model.compute_logits):
        get_engine("vllm").serve(tiny_llama_engine, parse_workload("n=1,prompt=32,output=2,arrivals=burst"),
                                 tiny_llama.config["vocab_size"])
    assert keys and min(keys) > 0.01 and max(keys) < 100  # O(1) keys, as a checkpoint's
    norms = [m.weight for m in model.modules() if "norm" in type(m).__name__.lower() and hasattr(m, "weight")]
    assert norms and all(torch.all(w == 1) for w in norms)
