"""vLLM attention through vLLM's own layer, KV-cache allocation, block table and metadata builder."""

from __future__ import annotations

import pytest
import torch

from dooly.catalog import resolve
from dooly.errors import DoolyError


@pytest.fixture(scope="module")
def rig():
    from dooly.engines.vllm.attention import AttentionRig

    return AttentionRig(resolve("dooly/tiny-llama").config, max_num_seqs=8, max_model_len=1024)


def _reference(q, keys, values, heads, kv_heads):
    # q [H, D] for one new token; keys/values [L, K, D]: plain softmax attention over all L tokens
    group = heads // kv_heads
    k = keys.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, L, D]
    v = values.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = (q.float()[:, None, :] @ k.transpose(1, 2)) / q.shape[-1] ** 0.5  # [H, 1, L]
    return (scores.softmax(-1) @ v)[:, 0, :]  # [H, D]


def test_decode_attends_over_every_cached_token(rig):
    from dooly.engines.vllm.attention import Batch

    B, L = 3, 300  # 3 requests, each with 299 cached tokens + 1 new: KV length 300 spans 3 blocks
    torch.manual_seed(0)
    ctx_k = torch.randn(B * (L - 1), rig.kv_heads, rig.head_size).to(rig.dtype)
    ctx_v = torch.randn(B * (L - 1), rig.kv_heads, rig.head_size).to(rig.dtype)
    # write the context into the paged cache with the layer's own KV-cache update (a prefill's write)
    fill, _, _ = rig.calls(Batch(context_lens=(0,) * B, query_lens=(L - 1,) * B), k=ctx_k, v=ctx_v)
    fill()
    q = torch.randn(B, rig.heads, rig.head_size).to(rig.dtype)
    k = torch.randn(B, rig.kv_heads, rig.head_size).to(rig.dtype)
    v = torch.randn(B, rig.kv_heads, rig.head_size).to(rig.dtype)
    update, attend, out = rig.calls(Batch(context_lens=(L - 1,) * B, query_lens=(1,) * B), q=q, k=k, v=v)
    update()
    attend()
    for i in range(B):
        keys = torch.cat([ctx_k[i * (L - 1):(i + 1) * (L - 1)], k[i:i + 1]])
        values = torch.cat([ctx_v[i * (L - 1):(i + 1) * (L - 1)], v[i:i + 1]])
        ref = _reference(q[i], keys, values, rig.heads, rig.kv_heads)
        torch.testing.assert_close(out[i].float(), ref, atol=2e-2, rtol=2e-2)
        # and attending over only the first 299 tokens would give a different answer
        short = _reference(q[i], keys[:-1], values[:-1], rig.heads, rig.kv_heads)
        assert (out[i].float() - short).abs().max() > 1e-3


def test_rig_reports_the_backend_and_refuses_others(rig):
    from dooly.engines.vllm.attention import AttentionRig

    assert rig.backend == "CPU_ATTN"
    with pytest.raises(DoolyError, match="available: CPU_ATTN"):
        AttentionRig(resolve("dooly/tiny-llama").config, backend="FLASH_ATTN")


def test_models_sharing_heads_share_attention_signatures(tmp_path, tiny_llama_trace):
    import json

    from dooly.trace import trace_model

    # same head layout, different depth and vocabulary: no new attention or KV-write signature
    cfg = dict(resolve("dooly/tiny-llama").config, num_hidden_layers=2, vocab_size=4000)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    other = trace_model(resolve(str(tmp_path)))

    def stateful(t):
        return {o.signature for o in t.ops if o.op.startswith("vllm::unified_")}

    assert len(stateful(tiny_llama_trace)) == 2
    assert stateful(other) == stateful(tiny_llama_trace)
    # a different KV-head count is a different attention kernel
    cfg2 = dict(resolve("dooly/tiny-llama").config, num_key_value_heads=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg2))
    assert not stateful(trace_model(resolve(str(tmp_path)))) & stateful(tiny_llama_trace)


def test_attention_grid_respects_engine_limits():
    from dooly.engines.vllm.attention import batch_of, stateful_points

    pts = stateful_points("vllm::unified_attention_with_output", "reduced", max_num_batched_tokens=512,
                          max_num_seqs=8, max_model_len=2048, kv_token_budget=10**6)
    assert pts and all(p.get("dec_reqs", 0) <= 8 and p.get("pre_chunk", 0) <= 512 for p in pts)
    assert all(p.get("dec_kv", 0) <= 2048 and p.get("pre_chunk", 0) + p.get("pre_ctx", 0) <= 2048 for p in pts)
    kinds = {tuple(sorted(p)) for p in pts}
    assert ("dec_kv", "dec_reqs") in kinds and ("pre_chunk", "pre_ctx") in kinds
    assert ("dec_kv", "dec_reqs", "pre_chunk", "pre_ctx") in kinds  # mixed steps
    mixed = batch_of({"dec_reqs": 2, "dec_kv": 100, "pre_chunk": 30, "pre_ctx": 0})
    assert mixed.context_lens == (99, 99, 0) and mixed.query_lens == (1, 1, 30)
