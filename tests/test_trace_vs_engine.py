"""The tracer's op list for a step equals what the real vLLM engine executes in that step."""

from __future__ import annotations

import pytest

from dooly.trace.instantiate import tensor_shapes


def _real_view(ops):
    return [(o.op, o.module, [tuple(a.shape) for a in o.args if a.kind == "tensor"]
             + [tuple(i.shape) for a in o.args if a.kind == "tensors" for i in a.items if i.kind == "tensor"],
             [a.dtype for a in o.args if a.kind == "tensor"]) for o in ops]


def _traced_view(trace, values):
    vals = {**trace.config_params, **values}
    out = []
    for o in trace.ops:
        shapes = tensor_shapes(tuple(a for a in o.args if a.kind == "tensor"), vals)
        shapes += tensor_shapes(tuple(a for a in o.args if a.kind == "tensors"), vals)
        out.append((o.op, o.module, shapes, [a.dtype for a in o.args if a.kind == "tensor"]))
    return out


def _engine_step(llm, prompts, record_after):
    """Add prompts [(id, n_tokens)] one engine step apart; record the step after `record_after` adds."""
    from vllm import SamplingParams

    from dooly.engines.vllm.engine import record_engine_model

    eng = llm.llm_engine
    sp = SamplingParams(max_tokens=3, min_tokens=3, ignore_eos=True, temperature=0)
    steps = None
    for k, (rid, n) in enumerate(prompts):
        eng.add_request(rid, {"prompt_token_ids": list(range(1, n + 1))}, sp)
        if k + 1 == record_after:
            with record_engine_model(llm) as steps:
                eng.step()
        else:
            eng.step()
    while eng.has_unfinished_requests():
        eng.step()
    return steps[0]


def test_mixed_step_matches_engine_op_for_op(tiny_llama_engine, tiny_llama_trace):
    # step 1 prefills a (20 tokens); step 2 runs a's decode + b's 30-token prefill: 31 tokens, 2 requests
    real = _engine_step(tiny_llama_engine, [("a", 20), ("b", 30)], record_after=2)
    traced = _traced_view(tiny_llama_trace, {"num_tokens": 31, "num_reqs": 2})
    real_v = _real_view(real)
    assert len(traced) == len(real_v)
    for i, (t, r) in enumerate(zip(traced, real_v)):
        assert t == r, f"op {i}: traced {t} != engine {r}"


def test_decode_step_matches_engine(tiny_llama_engine, tiny_llama_trace):
    # three requests prefilled together, then a pure decode step: 3 tokens, 3 requests
    from vllm import SamplingParams

    from dooly.engines.vllm.engine import record_engine_model

    eng = tiny_llama_engine.llm_engine
    sp = SamplingParams(max_tokens=3, min_tokens=3, ignore_eos=True, temperature=0)
    for rid in ("c", "d", "e"):
        eng.add_request(rid, {"prompt_token_ids": list(range(1, 9))}, sp)
    eng.step()
    with record_engine_model(tiny_llama_engine) as steps:
        eng.step()
    while eng.has_unfinished_requests():
        eng.step()
    traced = _traced_view(tiny_llama_trace, {"num_tokens": 3, "num_reqs": 3})
    assert _real_view(steps[0]) == traced


def test_recorded_attention_carries_backend_identity(tiny_llama_trace):
    attn = [o for o in tiny_llama_trace.ops if o.op == "vllm::unified_attention_with_output"]
    assert len(attn) == 4  # one per layer
    attrs = dict(attn[0].attrs)
    assert attrs["backend"] == "CPU_ATTN" and attrs["block_size"] == 128
    assert (attrs["num_heads"], attrs["num_kv_heads"], attrs["head_size"]) == (8, 4, 64)
    assert len({o.signature for o in attn}) == 1  # same kernel in every layer: one signature


@pytest.mark.parametrize("phase", ["step"])
def test_trace_has_no_unresolved_dims(tiny_llama_trace, phase):
    assert tiny_llama_trace.unresolved == 0
    assert all(o.phase == phase for o in tiny_llama_trace.ops)


def test_tracing_leaves_no_fake_module_behind(tiny_llama, tiny_llama_engine):
    # vLLM caches rotary modules process-wide: one built while tracing (fake tensors) must not be
    # handed to an engine started later in the same process
    from torch._subclasses.fake_tensor import FakeTensor
    from vllm.model_executor.layers import rotary_embedding

    from dooly.engines.vllm.engine import model_runner
    from dooly.trace import trace_model

    trace_model(tiny_llama, engine="vllm")
    cached = [b for m in rotary_embedding._ROPE_DICT.values() for b in m.buffers()]
    assert not any(isinstance(b, FakeTensor) for b in cached)
    model = model_runner(tiny_llama_engine).model
    assert not any(isinstance(b, FakeTensor) for b in model.buffers())
    assert not any(isinstance(p, FakeTensor) for p in model.parameters())


def test_traces_and_other_engines_leave_a_live_engines_groups(tiny_llama, tiny_llama_engine):
    """vLLM keeps parallel groups in process globals. A trace builds private ones, and stopping a
    second in-process engine leaves the shared ones: the first engine keeps serving."""
    from vllm.distributed import parallel_state as ps

    from dooly.engines.vllm.engine import start_engine, stop_engine
    from dooly.trace import trace_model

    tiny_llama_engine.llm_engine.step()  # its groups exist once it has run
    before = [ps._WORLD, ps._TP, ps._PP]
    assert all(g is not None for g in before)
    trace_model(tiny_llama, engine="vllm")
    assert [ps._WORLD, ps._TP, ps._PP] == before and all(a is b for a, b in zip([ps._WORLD, ps._TP, ps._PP], before))
    other = start_engine(tiny_llama.config)
    stop_engine(other)
    assert all(a is b for a, b in zip([ps._WORLD, ps._TP, ps._PP], before))
    steps = _engine_step(tiny_llama_engine, [("g", 12)], record_after=1)  # still serves
    assert any(o.op == "vllm::unified_attention_with_output" for o in steps)
