"""HF attention backends beyond sdpa/eager: flex_attention and continuous batching's paged cache.

Real transformers model code on fake tensors for the traces; real kernels (compiled flex attention,
transformers' PagedAttentionCache) for the replays, checked against softmax attention written out.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dooly.errors import DoolyError
from dooly.trace import trace_model

H, K, D = 8, 4, 64  # tiny-llama: attention heads, KV heads, head_dim


@pytest.fixture(scope="module")
def flex_trace(tiny_llama):
    return trace_model(tiny_llama, engine="hf", attention_backend="flex_attention")


@pytest.fixture(scope="module")
def paged_trace(tiny_llama):
    return trace_model(tiny_llama, engine="hf", attention_backend="paged|sdpa")


def _ops(trace, op, phase):
    return [o for o in trace.ops if o.op == op and o.phase == phase]


def _dims(o):
    return [list(d) for a in o.args for d in a.tensor_dims()]


def _ints(o):
    return [list(a.dims) for a in o.args if a.kind == "int"]


def _reference(q, k, v, scale, visible):
    """Softmax attention written out: q [b, h, s_q, d], k/v [b, kv_h, s_k, d] (GQA), visible [s_q, s_k]."""
    rep = q.shape[1] // k.shape[1]
    k, v = (x.float().repeat_interleave(rep, dim=1) for x in (k, v))
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v  # [b, h, s_q, d]


def _bottom_right_causal(s_q, s_k):
    """Query i is token s_k - s_q + i of its sequence: it sees every key up to itself."""
    return torch.arange(s_k)[None, :] <= (s_k - s_q) + torch.arange(s_q)[:, None]


def test_flex_trace_labels(flex_trace):
    t = flex_trace
    assert t.unresolved == 0 and not any("scaled_dot_product" in o.op for o in t.ops)
    for phase, q_len, kv_len in (("prefill", "seq_len", "seq_len"), ("decode", "1", "past_len + 1")):
        # one block mask per forward (outside the layers), one attention per layer
        (mask,) = _ops(t, "dooly::hf_flex_block_mask", phase)
        assert mask.module == "model" and _ints(mask) == [["batch_size"], [q_len], [kv_len]]
        attn = _ops(t, "dooly::hf_flex_attention", phase)
        assert len(attn) == 4 and {o.signature for o in attn} == {attn[0].signature}
        assert _dims(attn[0]) == [["batch_size", "num_attention_heads", q_len, "head_dim"],
                                  ["batch_size", "num_key_value_heads", kv_len, "head_dim"],
                                  ["batch_size", "num_key_value_heads", kv_len, "head_dim"]]
        assert attn[0].args[3].value == repr(D ** -0.5)


@pytest.mark.parametrize("phase, values", [("prefill", {"batch_size": 2, "seq_len": 5}),
                                           ("decode", {"batch_size": 2, "past_len": 6})])
def test_flex_replay_matches_softmax_attention(flex_trace, phase, values):
    from dooly.engines.hf import replay  # noqa: F401  (what the profiler imports for hf signatures)
    from dooly.profile.replay import materialize

    mask = _ops(flex_trace, "dooly::hf_flex_block_mask", phase)[0]
    materialize(mask.signature_text, values)()  # the mask op replays on its own
    call = materialize(_ops(flex_trace, "dooly::hf_flex_attention", phase)[0].signature_text, values)
    q, k, v, scale = call.args
    out = call().transpose(1, 2).float()  # [b, s_q, h, d] -> [b, h, s_q, d]
    s_q, s_k = q.shape[2], k.shape[2]
    assert (s_q, s_k) == ((5, 5) if phase == "prefill" else (1, 7))  # decode: 1 query over past_len + 1 keys
    expected = _reference(q, k, v, scale, _bottom_right_causal(s_q, s_k))
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    # the check tells the semantics apart: every key visible, or only the query's own key, differ
    own = torch.arange(s_k)[None, :] == (s_k - s_q) + torch.arange(s_q)[:, None]
    for wrong in (torch.ones(s_q, s_k, dtype=torch.bool), own):
        if not torch.equal(wrong, _bottom_right_causal(s_q, s_k)):
            assert (out - _reference(q, k, v, scale, wrong)).abs().max() > 0.1


def test_paged_trace_labels(paged_trace):
    t = paged_trace
    assert t.unresolved == 0 and {o.phase for o in t.ops} == {"prefill", "step"}
    kv = ["1", "num_key_value_heads", "num_tokens", "head_dim"]
    # a step of fresh prompts only writes the cache; a step with cached tokens writes, then reads back
    write = _ops(t, "dooly::hf_paged_kv_write", "prefill")
    update = _ops(t, "dooly::hf_paged_kv_update", "step")
    assert len(write) == len(update) == 4 and not _ops(t, "dooly::hf_paged_kv_update", "prefill")
    assert _dims(write[0]) == [kv, kv, ["num_tokens"]]
    assert _dims(update[0]) == [kv, kv, ["num_tokens"], ["num_tokens + past_len"]]
    assert dict(update[0].attrs) == {"backend": "paged", "head_size": D, "num_kv_heads": K, "page_size": 256}
    # sdpa over the flattened step: every query against every key under a [1, 1, tokens, keys] mask
    sdpa = _ops(t, "aten::_scaled_dot_product_flash_attention_for_cpu", "step")[0]
    keys = ["1", "num_attention_heads", "num_tokens + past_len", "head_dim"]
    assert _dims(sdpa) == [["1", "num_attention_heads", "num_tokens", "head_dim"], keys, keys,
                           ["1", "1", "num_tokens", "num_tokens + past_len"]]
    # logits only for the rows that sample (logits_to_keep = logits_indices)
    lm = next(o for o in t.ops if o.op == "aten::mm" and o.module == "lm_head" and o.phase == "step")
    assert _dims(lm) == [["num_reqs", "hidden_size"], ["hidden_size", "vocab_size"]]


def test_paged_eager_trace_labels(tiny_llama):
    t = trace_model(tiny_llama, engine="hf", attention_backend="paged|eager")
    assert t.unresolved == 0 and not any("scaled_dot_product" in o.op for o in t.ops)
    assert len(_ops(t, "dooly::hf_paged_kv_update", "step")) == 4
    soft = _ops(t, "aten::_softmax", "step")[0]
    assert _dims(soft) == [["1", "num_attention_heads", "num_tokens", "num_tokens + past_len"]]


def test_paged_replay_attends_over_cached_tokens(tiny_llama, paged_trace):
    """Two continuous-batching steps on transformers' cache; the traced sdpa replayed on what it returns."""
    from dooly.engines.hf.paged import PagedRig
    from dooly.records import Batch
    from dooly.profile.replay import materialize

    dt = torch.bfloat16
    rig = PagedRig(tiny_llama.config, dt, num_blocks=8, max_batch_tokens=32, page_size=4, attention_mask=True)
    # step 1: prompts of 5 (a) and 4 (b) tokens; step 2: a decodes 1 token, b prefills a chunk of 3
    k1, v1 = torch.randn(1, K, 9, D).to(dt), torch.randn(1, K, 9, D).to(dt)
    rig.update(k1, v1, rig.step(Batch((0, 0), (5, 4)), ["a", "b"]))
    k2, v2 = torch.randn(1, K, 4, D).to(dt), torch.randn(1, K, 4, D).to(dt)
    step = rig.step(Batch((5, 4), (1, 3)), ["a", "b"])
    keys, values = rig.update(k2, v2, step)
    # the cache hands back each request's cached tokens, then its new ones: [a0..a4 a5 | b0..b3 b4..b6]
    order = [(k1, 0, 5), (k2, 0, 1), (k1, 5, 9), (k2, 1, 4)]
    assert torch.equal(keys, torch.cat([x[:, :, i:j] for x, i, j in order], dim=2))

    sdpa = _ops(paged_trace, "aten::_scaled_dot_product_flash_attention_for_cpu", "step")[0]
    call = materialize(sdpa.signature_text, {"num_tokens": 4, "past_len": 9, "num_reqs": 2})
    q = call.args[0]
    rep = H // K
    call.args[1:3] = [x.repeat_interleave(rep, dim=1) for x in (keys, values)]  # repeat_kv, as traced
    call.kwargs["attn_mask"] = step["attention_mask"]
    out = call()[0].float()  # [1, h, 4, d]
    scale = json.loads(sdpa.signature_text)["args"][-1]["c"]
    for rows, cols in ((slice(0, 1), slice(0, 6)), (slice(1, 4), slice(6, 13))):  # request a, request b
        s_q, s_k = rows.stop - rows.start, cols.stop - cols.start
        expected = _reference(q[:, :, rows], keys[:, :, cols], values[:, :, cols], float(scale),
                              _bottom_right_causal(s_q, s_k))
        torch.testing.assert_close(out[:, :, rows], expected, atol=2e-2, rtol=2e-2)


def test_paged_profiler_times_transformers_cache_update(tiny_llama):
    from dooly.engines.hf.paged import KV_UPDATE_OP, KV_WRITE_OP, StatefulProfiler
    from dooly.profile.timing import measure

    attrs = {"backend": "paged", "head_size": D, "num_kv_heads": K, "page_size": 256}
    prof = StatefulProfiler("bfloat16", 256, 8)
    for op, point in ((KV_UPDATE_OP, {"dec_reqs": 8, "dec_kv": 1024}), (KV_WRITE_OP, {"num_tokens": 128})):
        factory = prof.make_call(op, tiny_llama.config, attrs, point)
        keys, _ = factory()()
        assert keys.shape == ((1, K, 8 * 1024, D) if op == KV_UPDATE_OP else (1, K, 128, D))
        assert measure(factory).median_us > 0


def test_unknown_backend_is_one_line_error(tiny_llama):
    from dooly.engine_interface import get_engine

    hf = get_engine("hf")
    attention_backends, run_trace = hf.attention_backends, hf.run_trace

    listed = "available: sdpa, eager, flex_attention, paged|sdpa, paged|eager"
    assert ", ".join(attention_backends()) in listed
    with pytest.raises(DoolyError, match=r"available: sdpa, eager, flex_attention, paged\|sdpa"):
        run_trace(tiny_llama.config, attention_backend="flash_attention_2")
    r = subprocess.run([sys.executable, "-m", "dooly.cli", "trace", "dooly/tiny-llama", "--engine", "hf",
                        "--attention-backend", "paged"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr and listed in r.stderr
    assert len([line for line in r.stderr.strip().splitlines() if line.startswith("error")]) == 1


def test_routing_is_scoped_to_the_trace(tiny_llama):
    from transformers.generation.continuous_batching.cache import PagedAttentionCache
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from dooly.engines.hf.ops import flex_leaves, paged_leaves

    update = PagedAttentionCache.update
    with pytest.raises(RuntimeError):
        with flex_leaves(), paged_leaves():
            assert PagedAttentionCache.update is not update
            raise RuntimeError("a failing trace")
    assert PagedAttentionCache.update is update
    assert "flex_attention" not in ALL_ATTENTION_FUNCTIONS._local_mapping
    assert "flex_attention" not in ALL_MASK_ATTENTION_FUNCTIONS._local_mapping
