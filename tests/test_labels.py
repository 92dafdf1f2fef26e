"""Hand-derived labels on real vLLM / HF model code (no mocks of the engine)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dooly.catalog import resolve
from dooly.trace import trace_model


def _first(trace, op, module_suffix):
    for o in trace.ops:
        if o.op == op and o.module.endswith(module_suffix):
            return o
    raise AssertionError(f"{op} in *{module_suffix} not traced")


def _dims(o):
    return [list(d) for a in o.args for d in a.tensor_dims()]


def _gemm(trace, module_suffix):
    """The GEMM a module runs, whichever kernel vLLM dispatched it to on this CPU (oneDNN, or SGL
    where AMX tiles exist): both take out [M, N] and x [M, K] first."""
    from dooly.engines.vllm.kernels import GEMM_OPS

    for o in trace.ops:
        if o.op in GEMM_OPS and o.module.endswith(module_suffix):
            return o
    raise AssertionError(f"no GEMM in *{module_suffix}")


QKV = "head_dim*(num_attention_heads + 2*num_key_value_heads)"


def test_llama_layer_labels(tiny_llama_trace):
    t = tiny_llama_trace
    # fused QKV GEMM: out [num_tokens, (H + 2K) * D], in [num_tokens, hidden]
    assert _dims(_gemm(t, "layers.0.self_attn.qkv_proj"))[:2] == [["num_tokens", QKV], ["num_tokens", "hidden_size"]]
    # the split sizes are config expressions too
    split = _first(t, "aten::split_with_sizes", "layers.0.self_attn")
    assert list(split.args[1].dims) == ["head_dim*num_attention_heads", "head_dim*num_key_value_heads",
                                        "head_dim*num_key_value_heads"]
    # gate_up: out [num_tokens, 2 * intermediate]; down: in [num_tokens, intermediate]
    assert _dims(_gemm(t, "layers.0.mlp.gate_up_proj"))[0] == ["num_tokens", "2*intermediate_size"]
    assert _dims(_gemm(t, "layers.0.mlp.down_proj"))[1] == ["num_tokens", "intermediate_size"]
    # RMSNorm (as native aten ops, as the CPU worker runs it): variance over hidden_size
    assert _dims(_first(t, "aten::pow.Tensor_Scalar", "layers.0.input_layernorm")) == [["num_tokens", "hidden_size"]]
    # rotary: positions, q, k, head size, cos/sin cache [max_position_embeddings, head_dim]
    rope = _first(t, "_C::rotary_embedding", "rotary_emb")
    assert _dims(rope) == [["num_tokens"], ["num_tokens", "head_dim*num_attention_heads"],
                           ["num_tokens", "head_dim*num_key_value_heads"], ["max_position_embeddings", "head_dim"]]
    # attention inputs: q [num_tokens, H, D], k/v [num_tokens, K, D]
    attn = _first(t, "vllm::unified_attention_with_output", "attn")
    assert _dims(attn)[:3] == [["num_tokens", "num_attention_heads", "head_dim"],
                               ["num_tokens", "num_key_value_heads", "head_dim"],
                               ["num_tokens", "num_key_value_heads", "head_dim"]]
    # lm_head runs on the sampled rows only: [num_reqs, hidden] -> [num_reqs, vocab]
    assert _dims(_gemm(t, "logits_processor"))[:2] == [["num_reqs", "vocab_size"], ["num_reqs", "hidden_size"]]


def test_same_gemm_in_every_layer_is_one_signature(tiny_llama_trace):
    from dooly.engines.vllm.kernels import GEMM_OPS

    [qkv] = [
        g for g in tiny_llama_trace.groups() if g.op in GEMM_OPS and g.module == "model.layers.*.self_attn.qkv_proj"
    ]
    assert qkv.count == 4  # 4 layers
    # the signature holds config dims as numbers and request dims as symbols:
    # (8 + 2*4) * 64 = 1024, hidden 512
    sig = json.loads(qkv.signature_text)
    assert sig["args"][0]["t"] == ["num_tokens", "1024"] and sig["args"][1]["t"] == ["num_tokens", "512"]


def test_value_collisions_do_not_change_labels(tiny_llama):
    # example sizes equal to config values: num_tokens = 64 = head_dim, num_reqs = 4 = num_key_value_heads
    t = trace_model(tiny_llama, hints=(64, 4))
    assert t.unresolved == 0
    attn = _first(t, "vllm::unified_attention_with_output", "attn")
    assert _dims(attn)[1] == ["num_tokens", "num_key_value_heads", "head_dim"]
    assert _dims(_gemm(t, "logits_processor"))[0] == ["num_reqs", "vocab_size"]
    # and a model whose head_dim is 128, with num_tokens = 128 and num_reqs = 8 = num_key_value_heads
    big = trace_model(resolve("meta-llama/Llama-3.1-8B"), hints=(128, 8))
    assert big.unresolved == 0
    attn = _first(big, "vllm::unified_attention_with_output", "attn")
    assert _dims(attn)[0] == ["num_tokens", "num_attention_heads", "head_dim"]
    assert _dims(_gemm(big, "logits_processor"))[1] == ["num_reqs", "hidden_size"]


def test_moe_expert_gemm_labels():
    t = trace_model(resolve("dooly/tiny-mixtral"))
    assert t.unresolved == 0
    router = _gemm(t, "block_sparse_moe.gate")
    assert _dims(router)[0] == ["num_tokens", "num_local_experts"]
    topk = _first(t, "aten::topk", "block_sparse_moe.experts")
    assert list(topk.args[1].dims) == ["num_experts_per_tok"]
    moe = _first(t, "_C::cpu_fused_moe", "block_sparse_moe.experts")
    d = _dims(moe)
    assert ["num_local_experts", "2*intermediate_size", "hidden_size"] in d  # fused w1/w3
    assert ["num_local_experts", "hidden_size", "intermediate_size"] in d  # w2
    assert ["num_tokens", "num_experts_per_tok"] in d  # routing weights / ids


def test_tp2_labels_and_collectives(tiny_llama):
    t = trace_model(tiny_llama, tensor_parallel_size=2)
    assert t.unresolved == 0
    assert _dims(_gemm(t, "qkv_proj"))[0] == ["num_tokens", f"{QKV}/tp"]
    assert _dims(_gemm(t, "down_proj"))[1] == ["num_tokens", "intermediate_size/tp"]
    attn = _first(t, "vllm::unified_attention_with_output", "attn")
    assert _dims(attn)[0] == ["num_tokens", "num_attention_heads/tp", "head_dim"]
    # one all-reduce on [num_tokens, hidden_size] after o_proj and after down_proj in every layer
    ar = [o for o in t.ops if o.op == "_C::shm_allreduce" and ".layers." in o.module]
    assert len(ar) == 2 * 4 and {tuple(_dims(o)[0]) for o in ar} == {("num_tokens", "hidden_size")}
    gather = _first(t, "_C::shm_all_gather", "logits_processor")
    assert _dims(gather) == [["num_reqs", "vocab_size/tp"], ["num_reqs*tp", "vocab_size/tp"]]


def test_hf_eager_attention_traces(tiny_llama):
    t = trace_model(tiny_llama, engine="hf", attention_backend="eager")
    assert t.unresolved == 0 and not any("scaled_dot_product" in o.op for o in t.ops)
    soft = next(o for o in t.ops if o.op.startswith("aten::_softmax") and o.phase == "decode")
    assert _dims(soft)[0] == ["batch_size", "num_attention_heads", "1", "past_len + 1"]


def test_hf_engine_prefill_and_decode_labels(tiny_llama):
    t = trace_model(tiny_llama, engine="hf")
    assert t.unresolved == 0 and {o.phase for o in t.ops} == {"prefill", "decode"}
    sdpa = [o for o in t.ops if "scaled_dot_product" in o.op]
    pre = next(o for o in sdpa if o.phase == "prefill")
    dec = next(o for o in sdpa if o.phase == "decode")
    assert _dims(pre)[1] == ["batch_size", "num_key_value_heads", "seq_len", "head_dim"]
    assert _dims(dec)[1] == ["batch_size", "num_key_value_heads", "past_len + 1", "head_dim"]
    q = next(o for o in t.ops if o.op == "aten::mm" and o.module.endswith("q_proj") and o.phase == "prefill")
    assert _dims(q) == [["batch_size*seq_len", "hidden_size"], ["hidden_size", "head_dim*num_attention_heads"]]


def test_plan_shares_signatures_across_models(tiny_llama_trace):
    from dooly.plan import plan

    # Llama-2-7B and its chat fine-tune share every signature; Llama-2-13B shares only what its dims allow
    traces = [trace_model(resolve(m)) for m in ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf")]
    rows, unique = plan(traces)
    assert rows[1].new == 0 and rows[1].shared == rows[0].signatures and unique == rows[0].signatures


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dooly.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["trace", "meta-llama/Llama-2-7b"], "unknown model"),
    (["trace", "dooly/tiny-llama", "--tp", "3"], "--tp 3 does not divide"),
    (["trace", "dooly/tiny-llama", "--dtype", "int3"], "unknown dtype"),
    (["trace", "dooly/tiny-llama", "--engine", "tgi"], "unknown engine"),
    (["trace", "dooly/tiny-llama", "--attention-backend", "FLASH_ATTN"], "available: CPU_ATTN"),
    (["trace", "dooly/tiny-llama", "--engine", "hf", "--attention-backend", "paged"], "available: sdpa, eager"),
])
def test_bad_input_one_line_errors(args, message):
    r = _cli(*args)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len([line for line in r.stderr.strip().splitlines() if line.startswith("error")]) == 1


def test_bad_configs(tmp_path):
    (tmp_path / "broken.json").write_text("{ not json")
    (tmp_path / "incomplete.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    cfg = json.loads(json.dumps(resolve("dooly/tiny-llama").config))
    cfg["model_type"], cfg["architectures"] = "bogus_arch", ["BogusForCausalLM"]
    (tmp_path / "arch.json").write_text(json.dumps(cfg))
    eos = json.loads(json.dumps(resolve("dooly/tiny-llama").config))
    eos["eos_token_id"] = eos["vocab_size"] + 5  # the engine would index the logits with it
    (tmp_path / "eos.json").write_text(json.dumps(eos))
    for name, message in (("broken.json", "malformed JSON"), ("incomplete.json", "missing"),
                          ("arch.json", ""), ("eos.json", "outside the vocabulary")):
        r = _cli("trace", str(tmp_path / name))
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert message in r.stderr
    assert "did you mean meta-llama/Llama-2-7b-hf" in _cli("trace", "meta-llama/Llama-2-7b").stderr


def test_trace_json_output():
    r = _cli("trace", "dooly/tiny-mixtral", "--format", "json")
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert d["model"] == "dooly/tiny-mixtral" and d["engine"] == "vllm" and d["unresolved"] == 0
    gemm = next(o for o in d["ops"] if o["op"] in ("_C::onednn_mm", "_C::weight_packed_linear")
                and o["module"].endswith("qkv_proj"))
    assert gemm["count"] == 2 and gemm["dims"][0] == ["num_tokens", QKV]
    assert all({"op", "signature", "count", "dims"} <= set(o) for o in d["ops"])
