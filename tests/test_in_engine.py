"""In-engine op ratios: op families, the ratio fit, its use in step prediction, and the engine's op timer."""

from __future__ import annotations

import pytest

from dooly.predict.in_engine import InEngineRatios, RatioSample, fit_ratios, ratio_replacements
from dooly.records import Batch


def test_op_families_follow_the_engines_op_names():
    from dooly.engine_interface import get_engine

    vllm = get_engine("vllm")
    assert vllm.op_family("_C::onednn_mm") == "gemm"
    assert vllm.op_family("vllm::unified_attention_with_output") == "attention"
    assert vllm.op_family("vllm::unified_kv_cache_update") == "kv_write"
    assert vllm.op_family("_C::shm_allreduce") == "collective"
    assert vllm.op_family("aten::mul.Tensor") == "elementwise"
    assert vllm.op_family("aten::view") == "free"
    assert get_engine("hf").op_family("aten::addmm") == "gemm"


def test_ratios_are_medians_per_size_bin_interpolated_in_log_size():
    samples = [RatioSample("gemm", 1, 2.0 * k, k) for k in (1.0, 2.0, 3.0)]  # ratio 2 at 1 token
    samples += [RatioSample("gemm", 64, 1.0, 1.0)] * 2 + [RatioSample("gemm", 64, 3.0, 1.0)] * 3  # median 3
    samples += [RatioSample("gemm", 1024, 5.0, 5.0)] * 2  # too few steps for a bin
    samples += [RatioSample("attention", 8, 1.0, 0.1)] * 5  # predicted below 1 us: no ratio
    curves = fit_ratios(samples)
    assert set(curves) == {"gemm"}
    assert [(n, r, steps, res) for n, r, _, _, steps, res in curves["gemm"]] == [(1, 2.0, 3, 1.0), (64, 3.0, 5, 1.0)]
    ratios = InEngineRatios(curves)
    assert ratios("gemm", 8) == pytest.approx(2.5)  # halfway between 1 and 64 in log size
    assert ratios("gemm", 1) == 2.0 and ratios("gemm", 4096) == 3.0  # held beyond the measured bins
    assert ratios("attention", 8) == 1.0  # no curve: the isolated prediction stands
    assert not InEngineRatios({})
    # a model whose weights the cache holds only a quarter of keeps a quarter of the deviation
    assert InEngineRatios(curves, residency=0.25)("gemm", 1) == pytest.approx(1.25)
    assert InEngineRatios(curves, residency=0.0)("gemm", 64) == pytest.approx(1.0)


def test_residency_follows_the_models_gemm_weights(tiny_llama_trace):
    from dooly.catalog import resolve
    from dooly.engine_interface import get_engine
    from dooly.predict.in_engine import residency, weight_bytes
    from dooly.profile.environment import LLC
    from dooly.trace import trace_model

    vllm = get_engine("vllm")
    c = resolve("dooly/tiny-llama").config
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    per_layer = h * (h + 2 * kv) + h * h + h * 2 * i + i * h  # qkv, o, gate_up, down
    assert weight_bytes(tiny_llama_trace, vllm) == 2 * (c["num_hidden_layers"] * per_layer + c["vocab_size"] * h)
    qwen = trace_model(resolve("Qwen/Qwen2.5-0.5B"), engine="vllm")  # ~1 GB of bf16 weights
    assert weight_bytes(qwen, vllm) > 500 * 2**20
    assert residency(qwen, vllm) == pytest.approx(LLC / weight_bytes(qwen, vllm)) and residency(qwen, vllm) < 0.5
    assert residency(tiny_llama_trace, vllm) == (1.0 if weight_bytes(tiny_llama_trace, vllm) <= LLC else
                                                 pytest.approx(LLC / weight_bytes(tiny_llama_trace, vllm)))


def test_step_prediction_scales_each_family_by_its_ratio(profiled_copy, tiny_llama_trace):
    from dooly.predict import Predictor, predict_step

    db, env = profiled_copy
    batch = Batch((0, 40), (30, 1))
    before = predict_step(tiny_llama_trace, Predictor(db, env), batch, overhead=False)
    assert not before.in_engine  # nothing calibrated: isolated predictions
    db.replace_measurements(env, ratio_replacements({"gemm": [(1, 2.0, 2.0, 2.0, 3, 0.0), (4096, 2.0, 2.0, 2.0, 3, 0.0)]},
                                                    1.0))  # calibrated at residency 0: any model gets it all
    after = predict_step(tiny_llama_trace, Predictor(db, env), batch, overhead=False)
    assert after.in_engine
    assert after.by_family["gemm"] == pytest.approx(2 * before.by_family["gemm"])
    for family in ("attention", "kv_write", "elementwise"):
        assert after.by_family[family] == pytest.approx(before.by_family[family])
    assert after.us == pytest.approx(before.us + before.by_family["gemm"])


def test_replacing_measurements_is_all_or_nothing(profiled_copy):
    from dooly.db import Measurement

    db, env = profiled_copy
    db.replace_measurements(env, ratio_replacements({"gemm": [(1, 1.5, 1.0, 2.0, 3, 1.0)]}, 1.0))
    bad = ratio_replacements({"gemm": [(1, 9.0, 9.0, 9.0, 3, 1.0)]}, 1.0)
    bad[-1] = (bad[-1][0], bad[-1][1], bad[-1][2], [Measurement(bad[-1][0], None, 1.0, 1.0, 1.0, 1, 1.0)])
    with pytest.raises(Exception):
        db.replace_measurements(env, bad)  # the last replacement fails: the first must not land
    assert InEngineRatios.load(db, env.key)("gemm", 1) == 1.5


def test_engine_times_every_op_it_runs(tiny_llama_engine, tiny_llama_trace):
    from dooly.engine_interface import get_engine
    from dooly.workload import parse_workload

    engine = get_engine("vllm")
    requests = parse_workload("n=2,prompt=uniform:20:60,output=3,arrivals=burst,seed=3")
    tiny_llama_engine.reset_prefix_cache()
    with engine.time_ops(tiny_llama_engine) as timed:
        steps = engine.serve(tiny_llama_engine, requests, 8000)[1]
    assert len(timed) == len(steps) >= 3  # one op table per model step
    traced = {}
    for op in tiny_llama_trace.ops:
        traced[op.op] = traced.get(op.op, 0) + 1
    for ops in timed:  # the engine runs the traced op list, every call timed
        assert {op: calls for op, (_, calls) in ops.items()} == traced
        assert all(us > 0 for us, _ in ops.values())
