"""The trace follows vLLM's CPU kernel dispatch on any CPU: the SGL (AMX) GEMM path, its fake kernels,
its replay, and what a machine cannot measure.

vLLM sends small weights to the SGL kernel only where AMX tiles exist. A fake trace needs only shapes,
so these tests force vLLM's own predicate (`torch.cpu._is_amx_tile_supported`) inside the test and
run on any CPU. The real SGL kernels (`_C::convert_weight_packed`, `_C::weight_packed_linear`) also
run without AMX on AVX-512 CPUs (their non-AMX code path), so the engine and replay tests check the
same op lists and the same replay on an AMD EPYC as on an Intel Xeon with AMX.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from unittest import mock

import pytest
import torch

from dooly.engines.vllm.kernels import amx_dispatch
from dooly.errors import DoolyError

HAS_AMX = torch.cpu._is_amx_tile_supported()


@contextlib.contextmanager
def sgl_gemms():
    """vLLM's small-weight GEMM rule without its AMX-tile requirement, for a real engine here: the
    SGL kernels run on AVX-512 too. Attention and MoE keep this machine's own ISA."""
    from vllm.model_executor.layers import utils

    rule = utils.check_cpu_sgl_kernel

    def without_amx_requirement(n, k, dtype):
        with amx_dispatch():
            return rule(n, k, dtype)

    with mock.patch.object(utils, "check_cpu_sgl_kernel", without_amx_requirement):
        yield


def _gemm_ops(trace):
    return {(o.module.split("layers.")[-1].split(".", 1)[-1], o.op) for o in trace.ops
            if o.op in ("_C::weight_packed_linear", "_C::onednn_mm")}


@pytest.fixture(scope="module")
def amx_traces():
    from dooly.catalog import resolve
    from dooly.trace import trace_model

    with amx_dispatch():
        return {m: trace_model(resolve(m), engine="vllm") for m in ("dooly/tiny-llama", "dooly/tiny-mixtral")}


# --- fake kernels ---------------------------------------------------------------------------------

WEIGHTS = [  # (shape, dtype): VNNI-packed, fp32 fallback (N < 16), int8 with compensation, 3-D experts
    ((64, 128), torch.bfloat16), ((8, 64), torch.bfloat16), ((15, 33), torch.bfloat16),
    ((32, 96), torch.float16), ((64, 256), torch.int8), ((4, 64, 128), torch.bfloat16),
    ((4, 64, 128), torch.int8),
]


@pytest.mark.parametrize("shape,dtype", WEIGHTS, ids=lambda v: str(v))
def test_fake_packing_returns_what_the_kernel_returns(shape, dtype):
    import vllm._custom_ops  # noqa: F401
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dooly.engines.vllm.kernels import fake_kernels

    weight = (torch.randn(shape) * 8).to(dtype)
    real = torch.ops._C.convert_weight_packed(weight)  # the C++ kernel, on this CPU
    with fake_kernels(), FakeTensorMode(allow_non_fake_inputs=True) as fm:
        fake = torch.ops._C.convert_weight_packed(fm.from_tensor(weight))
    assert (tuple(fake.shape), fake.dtype) == (tuple(real.shape), real.dtype)
    # e.g. [8, 64] bf16 -> fp32 [64, 8]; [64, 256] int8 -> [64, 260] (an int32 sum per row)


def test_fake_kernels_leave_nothing_behind():
    import vllm._custom_ops  # noqa: F401
    from torch._subclasses.fake_tensor import FakeTensorMode, UnsupportedOperatorException

    from dooly.engines.vllm.kernels import fake_kernels

    weight = torch.randn(64, 128).bfloat16()
    with fake_kernels(), FakeTensorMode(allow_non_fake_inputs=True) as fm:
        torch.ops._C.convert_weight_packed(fm.from_tensor(weight))
    with pytest.raises(UnsupportedOperatorException), FakeTensorMode(allow_non_fake_inputs=True) as fm:
        torch.ops._C.convert_weight_packed(fm.from_tensor(weight))


def test_an_op_without_fake_kernel_fails_in_one_line_naming_it(tiny_llama, monkeypatch):
    from dooly.engines.vllm import kernels
    from dooly.trace import trace_model

    monkeypatch.delitem(kernels.FAKE_KERNELS, "_C::convert_weight_packed")
    with amx_dispatch(), pytest.raises(DoolyError) as e:
        trace_model(tiny_llama, engine="vllm")
    msg = str(e.value)
    assert "\n" not in msg and "_C::convert_weight_packed" in msg and "no fake kernel" in msg


def test_a_second_fake_kernel_for_one_op_is_refused():
    from dooly.engines.vllm.kernels import fake_kernel

    with pytest.raises(ValueError, match="already registered"):
        fake_kernel("_C::convert_weight_packed")(lambda w: w)


# --- tracing the SGL path -------------------------------------------------------------------------

def test_amx_trace_sends_small_gemms_to_sgl(amx_traces):
    llama = amx_traces["dooly/tiny-llama"]
    assert llama.unresolved == 0 and "amx_tile=1" in llama.dispatch_key
    # SGL takes weights of at most 1 MiB: qkv 1024 x 512 x 2 B = 1 MiB, o_proj 512 x 512 x 2 B;
    # gate_up 2816 x 512 x 2 B, down 512 x 1408 x 2 B and the lm_head 8000 x 512 x 2 B are larger
    assert _gemm_ops(llama) == {("self_attn.qkv_proj", "_C::weight_packed_linear"),
                                ("self_attn.o_proj", "_C::weight_packed_linear"),
                                ("mlp.gate_up_proj", "_C::onednn_mm"),
                                ("mlp.down_proj", "_C::onednn_mm"),
                                ("logits_processor", "_C::onednn_mm")}
    qkv = next(o for o in llama.ops if o.op == "_C::weight_packed_linear")
    out, x, packed = (a.dims for a in qkv.args[:3])
    assert packed == ("head_dim*(num_attention_heads + 2*num_key_value_heads)", "hidden_size")  # VNNI [N, K]
    assert qkv.args[2].dtype == "bfloat16" and qkv.args[4].value == "True"  # is_vnni
    attn = next(o for o in llama.ops if o.op == "vllm::unified_attention_with_output")
    assert dict(attn.attrs)["isa"] == "amx"


def test_amx_trace_labels_moe_router_and_experts(amx_traces):
    mixtral = amx_traces["dooly/tiny-mixtral"]
    assert mixtral.unresolved == 0
    gate = next(o for o in mixtral.ops if o.op == "_C::weight_packed_linear" and o.module.endswith("gate"))
    # 8 experts < 16: the router weight is packed as fp32, transposed to [K, N]
    assert gate.args[2].dims == ("hidden_size", "num_local_experts") and gate.args[2].dtype == "float32"
    moe = next(o for o in mixtral.ops if o.op == "_C::cpu_fused_moe")
    assert moe.args[10].value == "'amx'"


def test_perturbed_runs_keep_the_real_runs_kernels(tiny_llama):
    """16 experts pack VNNI; the perturbed runs' 5 and 7 experts alone would pack fp32 [K, N]: the
    tracer pins the real run's kernel and layout, so the router's dims still get labels."""
    from dooly.catalog import ModelSpec, resolve
    from dooly.trace import trace_model

    base = resolve("dooly/tiny-mixtral")
    spec = ModelSpec("test/mixtral-16-experts", {**base.config, "num_local_experts": 16}, "test")
    with amx_dispatch():
        t = trace_model(spec, engine="vllm")
    gate = next(o for o in t.ops if o.op == "_C::weight_packed_linear" and o.module.endswith("gate"))
    assert t.unresolved == 0
    assert gate.args[2].dims == ("num_local_experts", "hidden_size") and gate.args[2].dtype == "bfloat16"


def test_dispatch_is_part_of_the_trace_cache_key(tiny_llama, tmp_path, monkeypatch):
    from dooly.trace import trace_model

    monkeypatch.setenv("DOOLY_CACHE", str(tmp_path))
    here = trace_model(tiny_llama, engine="vllm", cache=True)
    with amx_dispatch():
        amx = trace_model(tiny_llama, engine="vllm", cache=True)
    assert len(list((tmp_path / "traces").glob("*.json"))) == (1 if HAS_AMX else 2)
    assert ("_C::weight_packed_linear" in {o.op for o in here.ops}) == HAS_AMX
    assert "_C::weight_packed_linear" in {o.op for o in amx.ops}


# --- the real engine and replay on the SGL path ---------------------------------------------------

@pytest.fixture(scope="module")
def sgl_engine(tiny_llama):
    """A real in-process engine whose linears run the SGL kernels (natively on AMX, AVX-512 elsewhere)."""
    from dooly.engines.vllm.engine import running_engine

    with contextlib.ExitStack() as stack:
        with sgl_gemms():  # vLLM picks each layer's kernel while loading: the rule is needed only then
            llm = stack.enter_context(running_engine(tiny_llama.config))
        yield llm


def test_sgl_engine_step_equals_the_trace(sgl_engine, tiny_llama):
    from test_trace_vs_engine import _engine_step, _real_view, _traced_view

    from dooly.trace import trace_model

    with sgl_gemms():
        trace = trace_model(tiny_llama, engine="vllm")
    real = _real_view(_engine_step(sgl_engine, [("a", 20), ("b", 30)], record_after=2))
    traced = _traced_view(trace, {"num_tokens": 31, "num_reqs": 2})
    assert sum(op == "_C::weight_packed_linear" for op, *_ in real) == 8  # 4 layers x (qkv, o_proj)
    assert len(real) == len(traced)
    for i, (t, r) in enumerate(zip(traced, real)):
        assert t == r, f"op {i}: traced {t} != engine {r}"


def test_sgl_signatures_replay_and_profile(amx_traces, tmp_path):
    """The packed operand is made by the engine's own packing op; every SGL point is measured."""
    from dooly.db import LatencyDB
    from dooly.engine_interface import get_engine
    from dooly.profile import Limits, current_environment, plan_profile, run_profile
    from dooly.profile.replay import materialize
    from dooly.trace.records import Trace

    version = get_engine("vllm").version

    get_engine("vllm").load_replay_rules()
    llama = amx_traces["dooly/tiny-llama"]
    sgl = [g for g in llama.groups() if g.op == "_C::weight_packed_linear"]
    qkv = next(g for g in sgl if g.module.endswith("qkv_proj"))
    call = materialize(qkv.signature_text, {"num_tokens": 5})
    packed = call.args[2]
    assert tuple(packed.shape) == (1024, 512) and packed.dtype == torch.bfloat16  # 8+2*4 heads x 64; hidden 512
    call()
    assert call.args[0].shape == (5, 1024) and call.args[0].abs().sum() > 0
    only_sgl = Trace(**{**llama.__dict__, "ops": [o for o in llama.ops if o.op == "_C::weight_packed_linear"]})
    env = current_environment("vllm", version(), "bfloat16", 1)
    db = LatencyDB(f"sqlite:///{tmp_path / 'sgl.db'}")
    plan = plan_profile([only_sgl], env, {}, "reduced", Limits(64, 4))
    summary = run_profile(plan, db)
    assert not summary.failed and summary.points_measured == sum(len(w.points) for w in plan.work) > 0
    assert {w.op for w in plan.work} == {"_C::weight_packed_linear"}


def test_what_this_cpu_cannot_measure_is_named_and_refused(amx_traces):
    from dooly.engine_interface import get_engine
    from dooly.profile import Limits, current_environment, plan_profile
    from dooly.profile.profilable import not_profilable

    version = get_engine("vllm").version

    mixtral = amx_traces["dooly/tiny-mixtral"]
    blocked = not_profilable(mixtral)
    if HAS_AMX:
        assert blocked == {}
        return
    # AMX attention and the AMX fused MoE cannot run here; the SGL GEMMs can (AVX-512 path)
    assert {op for op, _ in blocked.values()} == {"vllm::unified_attention_with_output",
                                                  "vllm::unified_kv_cache_update", "_C::cpu_fused_moe"}
    assert all("AMX" in why for _, why in blocked.values())
    env = current_environment("vllm", version(), "bfloat16", 1)
    with pytest.raises(DoolyError) as e:
        plan_profile([mixtral], env, {}, "reduced", Limits(64, 4))
    assert "\n" not in str(e.value) and "not profilable here" in str(e.value) and "_C::cpu_fused_moe" in str(e.value)


def test_traces_made_here_are_profilable_here(tiny_llama_trace):
    from dooly.profile.profilable import not_profilable

    assert not_profilable(tiny_llama_trace) == {}


# --- dooly env ------------------------------------------------------------------------------------

def test_dooly_env_names_the_cpu_and_each_gemms_kernel():
    out = subprocess.run([sys.executable, "-m", "dooly.cli", "env", "dooly/tiny-llama"], capture_output=True,
                         text=True, timeout=600, env={**__import__("os").environ, "COLUMNS": "250"})
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    assert cpu in text
    assert ("AMX tiles       │ yes" if HAS_AMX else "AMX tiles       │ no") in text
    assert "qkv_proj" in text and ("SGL" if HAS_AMX else "oneDNN") in text
    assert "every op of dooly/tiny-llama is profilable here" in text


def test_dooly_env_rejects_bad_input_in_one_line():
    out = subprocess.run([sys.executable, "-m", "dooly.cli", "env", "--tp", "0"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "--tp" in out.stderr


def test_trace_json_carries_the_dispatch(tiny_llama_trace):
    d = json.loads(json.dumps(tiny_llama_trace.to_json()))
    assert d["dispatch"].startswith("amx_tile=") and ("amx_tile=1" in d["dispatch"]) == HAS_AMX
