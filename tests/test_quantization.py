"""Quantized weights as a configuration axis: a checkpoint's `quantization_config` (compressed-tensors
int8 W8A8) traced, labelled, profiled by replay, simulated, and run by the real engine; schemes the
tracer cannot set up, and bad group sizes, refused in one line."""

from __future__ import annotations

import copy

import pytest

from dooly.errors import DoolyError

LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
INT8_GEMMS = {"_C::onednn_scaled_mm", "_C::int8_scaled_mm_with_quant"}  # oneDNN here; SGL on AMX machines


@pytest.fixture(scope="module")
def w8a8():
    from dooly.catalog import resolve

    return resolve("dooly/tiny-llama-w8a8")


@pytest.fixture(scope="module")
def w8a8_trace(w8a8):
    from dooly.trace import trace_model

    return trace_model(w8a8)


def _in_linear(op) -> bool:
    return op.module.rsplit(".", 1)[-1] in LINEARS


def test_w8a8_is_labelled_and_shares_all_but_its_linears_with_the_bf16_twin(w8a8_trace, tiny_llama_trace):
    t = w8a8_trace
    assert t.unresolved == 0
    gemms = {op.op for op in t.ops if _in_linear(op) and op.op in INT8_GEMMS}
    assert len(gemms) == 1  # every decoder linear runs the machine's one int8 kernel
    assert not any(op.op in ("_C::onednn_mm", "_C::weight_packed_linear") for op in t.ops if _in_linear(op))
    if gemms == {"_C::onednn_scaled_mm"}:  # activations quantized to int8 by their own op first
        assert any(op.op == "_C::dynamic_scaled_int8_quant" for op in t.ops if _in_linear(op))
    bf16_rest = {op.signature for op in tiny_llama_trace.ops if not _in_linear(op)}
    assert bf16_rest <= t.signatures()  # attention, norms, rotary, embedding, logits: shared measurements


def test_w8a8_on_amx_dispatch_is_labelled_and_replays():
    """What an AMX machine runs (forced predicate: the trace needs only shapes): SGL's int8 GEMM on
    weights packed with a 4-byte compensation per row (K + 4); replayed here with a weight the
    engine's own packing op made."""
    from dooly.catalog import resolve
    from dooly.engine_interface import get_engine
    from dooly.engines.vllm.kernels import amx_dispatch
    from dooly.profile.replay import materialize
    from dooly.trace import trace_model

    with amx_dispatch():
        t = trace_model(resolve("dooly/tiny-llama-w8a8"))
    assert t.unresolved == 0
    sgl = [g for g in t.groups() if g.op == "_C::int8_scaled_mm_with_quant"]
    assert {g.module.rsplit(".", 1)[-1] for g in sgl} == set(LINEARS)
    down = next(g for g in sgl if g.module.endswith("down_proj"))
    assert down.args[1].tensor_dims()[0] == ("hidden_size", "intermediate_size + 4")
    get_engine("vllm").load_replay_rules()
    for g in sgl:
        out = materialize(g.signature_text, {"num_tokens": 8})()
        assert out.shape[0] == 8 and str(out.dtype) == "torch.bfloat16"


def test_w8a8_profiles_by_replay_simulates_and_the_engine_runs_the_traced_ops(w8a8, w8a8_trace, profiled_copy):
    """Profiled into a database holding its bf16 twin: only the quantized ops are measured; the
    simulation answers from them; the real engine (dummy int8 weights) runs exactly the traced ops."""
    from dooly.engine_interface import get_engine
    from dooly.engines.vllm.engine import running_engine
    from dooly.profile import Limits, plan_profile, run_profile
    from dooly.api import simulate
    from dooly.workload import parse_workload

    db, env = profiled_copy
    plan = plan_profile([w8a8_trace], env, db.points(env.key), "reduced", Limits(128, 8))
    new = {w.op for w in plan.work if any((w.signature, p) not in plan.stored for p in w.points)}
    assert new and new <= INT8_GEMMS | {"_C::dynamic_scaled_int8_quant", "aten::empty.memory_format"}
    summary = run_profile(plan, db)
    assert not summary.failed and summary.points_reused > 0
    res = simulate("dooly/tiny-llama-w8a8", "n=4,prompt=uniform:16:100,output=4,arrivals=burst,seed=2",
                   db=db.url, max_num_batched_tokens=128, max_num_seqs=8)
    assert len(res.requests) == 4 and (res.requests["ttft_s"] > 0).all()

    engine = get_engine("vllm")
    traced = {}
    for op in w8a8_trace.ops:
        traced[op.op] = traced.get(op.op, 0) + 1
    with running_engine(w8a8.config) as llm:
        with engine.time_ops(llm) as timed:
            engine.serve(llm, parse_workload("n=2,prompt=uniform:20:60,output=3,arrivals=burst,seed=3"), 8000)
    assert len(timed) >= 3
    for ops in timed:
        assert {op: calls for op, (_, calls) in ops.items()} == traced


def _with_quantization(spec, **changes):
    from dooly.catalog import ModelSpec

    config = copy.deepcopy(spec.config)
    config["quantization_config"] = {**config.get("quantization_config", {}), **changes}
    return ModelSpec(name="bad-quant", config=config, source="test")


@pytest.mark.parametrize("changes,needle", [
    ({"quant_method": "awq", "bits": 4, "group_size": 96, "version": "gemm", "zero_point": True,
      "config_groups": None}, "group_size 96 does not divide the input of a linear layer, hidden_size = 512"),
    ({"quant_method": "awq", "bits": 4, "group_size": 0, "config_groups": None}, "group_size must be"),
    ({"quant_method": None}, "quant_method"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True,
      "config_groups": None, "format": None}, "quantized as awq cannot be traced here"),
])
def test_bad_quantization_configs_are_one_line(w8a8, changes, needle):
    from dooly.trace import trace_model

    with pytest.raises(DoolyError, match=needle.replace("(", r"\(")) as e:
        trace_model(_with_quantization(w8a8, **changes))
    assert "\n" not in str(e.value)


def test_quantization_flag_names_the_checkpoints_method_or_is_refused(w8a8, w8a8_trace):
    """`--quantization` as vLLM spells it: the checkpoint's own method traces the same step (and the
    trace remembers it, for the profile command it suggests); another checkpoint method is vLLM's
    mismatch, in one line."""
    from dooly.predict.step import profile_command
    from dooly.trace import trace_model

    t = trace_model(w8a8, quantization="compressed-tensors")
    assert t.quantization == "compressed-tensors" and t.unresolved == 0
    assert [op.signature for op in t.ops] == [op.signature for op in w8a8_trace.ops]
    assert "--quantization compressed-tensors" in profile_command(t, "sqlite:///x.db")
    with pytest.raises(DoolyError, match="does not match the quantization method specified") as e:
        trace_model(w8a8, quantization="awq")
    assert "\n" not in str(e.value)


def test_quantization_is_a_grid_axis():
    from dooly.search.grid import configurations, parse_grid

    configs = configurations(["dooly/tiny-llama-w8a8"], parse_grid(["quantization=auto,compressed-tensors"]))
    assert [c.quantization for c in configs] == [None, "compressed-tensors"]
    assert configs[1].engine_kwargs()["quantization"] == "compressed-tensors"
    assert "quantization=compressed-tensors" in configs[1].key
    with pytest.raises(DoolyError, match="quantization=int3"):
        parse_grid(["quantization=int3"])
