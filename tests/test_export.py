"""`dooly export vidur`: Vidur's files, checked against what Vidur's reader requires and against dooly's predictors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest

from dooly.errors import DoolyError

MODEL = "dooly/tiny-llama"  # hidden 512, 8 heads / 4 KV heads, FFN 1408, vocab 8000, 4 layers
TOKENS, SEQS = 512, 16  # engine limits given to the export (the profile was taken at 128 / 8)

# The contract, from Vidur 0.0.26's vidur/execution_time_predictor/sklearn_execution_time_predictor.py:
# _get_input_files asserts the compute dataset's config.json "model" / "device_sku" and the network one's "sku";
# _load_compute_df keeps the mlp.csv rows equal to the model on these columns ...
MLP_FILTER = {"n_head": 8, "n_kv_head": 4, "n_embd": 512, "n_expanded_embd": 1408, "use_gated_mlp": True,
              "vocab_size": 8000, "num_tensor_parallel_workers": 1}
# ... and _train_general_models fits each of these on num_tokens;
MLP_TARGETS = ["attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj", "mlp_act", "input_layernorm",
               "post_attention_layernorm", "attn_rope", "add"]
# _load_attention_df keeps the attention.csv rows equal on these (block_size: the engine's, 128 on vLLM CPU) ...
ATTENTION_FILTER = {"n_embd": 512, "n_q_head": 8, "n_kv_head": 4, "block_size": 128, "num_tensor_parallel_workers": 1}
# ... _get_attention_df_with_derived_features reads prefill_chunk_size and batch_size (decode: chunk 0),
# _train_attention_layer_models fits attn_prefill on (kv_cache_size, prefill_chunk_size) over the prefill rows
# and attn_decode on (batch_size, kv_cache_size) over the decode rows; attn_kv_cache_save on num_tokens, all rows.


@pytest.fixture(scope="module")
def exported(profiled, tmp_path_factory):
    from dooly.export import export_vidur

    db, _ = profiled
    return export_vidur(MODEL, tmp_path_factory.mktemp("vidur") / "export", db=db.url,
                        max_num_batched_tokens=TOKENS, max_num_seqs=SEQS)


def snapshot(folder, kind: str, repo_id: str):
    """The folder huggingface_hub.snapshot_download resolves offline from a cache: refs/main -> snapshots/<rev>."""
    repo = folder / "profiling_data" / kind / f"datasets--{repo_id.replace('/', '--')}"
    return repo / "snapshots" / (repo / "refs" / "main").read_text()


def test_files_meet_vidurs_reader(exported):
    v = exported.manifest["vidur"]
    compute = snapshot(exported.folder, "compute", v["compute_dataset"])
    assert json.loads((compute / "config.json").read_text()) == {"model": MODEL, "device_sku": "cpu"}
    assert json.loads((snapshot(exported.folder, "network", v["network_dataset"]) / "config.json").read_text()) \
        == {"sku": "cpu"}
    mlp = pd.read_csv(compute / "mlp.csv.xz")  # as Vidur reads it (compression from the name)
    att = pd.read_csv(compute / "attention.csv.xz")
    assert mlp.equals(pd.read_csv(exported.folder / "data/profiling/compute/cpu" / MODEL / "mlp.csv"))
    keep = pd.concat([mlp[k] == val for k, val in MLP_FILTER.items()], axis=1).all(axis=1)
    assert keep.all()
    for op in MLP_TARGETS:
        assert (mlp[f"time_stats.{op}.median"] > 0).all(), op
    # Vidur's profiler grid up to 512 tokens: 1, 2, 4, then every 8th: 3 + 512 / 8 = 67 rows
    assert mlp["num_tokens"].tolist() == [1, 2, 4, *range(8, 513, 8)]

    assert pd.concat([att[k] == val for k, val in ATTENTION_FILTER.items()], axis=1).all(axis=1).all()
    prefill, decode = att[att["prefill_chunk_size"] > 0], att[att["prefill_chunk_size"] == 0]
    assert prefill["is_prefill"].all() and (prefill["batch_size"] == 1).all() and not decode["is_prefill"].any()
    assert prefill["time_stats.attn_prefill.median"].gt(0).all() and decode["time_stats.attn_decode.median"].gt(0).all()
    assert att["time_stats.attn_kv_cache_save.median"].gt(0).all()
    # chunks: 32..128 by 32, then 256..512 by 128; each after 0, c, 2c, ... cached tokens while c + kv <= 4096
    assert sorted(prefill["prefill_chunk_size"].unique()) == [32, 64, 96, 128, 256, 384, 512]
    assert sorted(prefill.loc[prefill["prefill_chunk_size"] == 512, "kv_cache_size"]) == list(range(0, 3585, 512))
    # decodes: every batch size 1..16 at kv 32..1024 by 32 (32 sizes) and 1088..4032 by 64 (47): 79 x 16 rows
    assert len(decode) == 79 * 16 and sorted(decode["batch_size"].unique()) == list(range(1, 17))
    assert decode["kv_cache_size"].min() == 32 and decode["kv_cache_size"].max() == 4032
    # Vidur precomputes and looks up exactly this range: batch <= 16, chunks <= 512, tokens <= 4096
    args = dict(zip(v["args"][::2], v["args"][1::2]))
    pre = "--random_forrest_execution_time_predictor_config_"
    assert (args[f"{pre}prediction_max_batch_size"], args[f"{pre}prediction_max_prefill_chunk_size"],
            args[f"{pre}prediction_max_tokens_per_request"]) == ("16", "512", "4096")
    assert args["--cache_config_block_size"] == "128" and args["--replica_config_model_name"] == MODEL


def test_values_are_dooly_predictions(exported, profiled, tiny_llama_trace):
    from dooly.predict import Predictor, predict_step
    from dooly.records import Batch
    from dooly.records import FREE, classify

    db, env = profiled
    pred = Predictor(db, env)
    ops = [o for o in tiny_llama_trace.ops if classify(o.op, o.attrs) != FREE]

    def first(module_end, op=None):
        return next(o for o in ops if o.module.endswith(module_end) and (op is None or o.op == op)).signature

    def at(n, where):  # predicted ms of every op whose module passes `where`, at n tokens (1 request)
        return sum(pred.latency(o.signature, {"num_tokens": n, "num_reqs": 1}).us for o in ops if where(o.module)) / 1e3

    mlp, att = exported.mlp.set_index("num_tokens"), exported.attention
    for n in (8, 64, 512):
        # all 4 layers run the same signature: 4 x prediction / 4 layers
        for col, module in (("attn_pre_proj", "layers.0.self_attn.qkv_proj"), ("mlp_down_proj", "layers.0.mlp.down_proj"),
                            ("attn_rope", "layers.0.self_attn.rotary_emb")):
            p = pred.latency(first(module), {"num_tokens": n})
            assert mlp.loc[n, f"time_stats.{col}.median"] == pytest.approx(p.us / 1e3, rel=1e-9)
            assert mlp.loc[n, f"dooly.{col}.extrapolated"] == p.extrapolated
        # the norms' ops, residual adds included, are split over three columns without loss
        norms = mlp.loc[n, [f"time_stats.{c}.median" for c in ("input_layernorm", "post_attention_layernorm", "add")]]
        assert 4 * norms.sum() == pytest.approx(at(n, lambda m: m.endswith("layernorm")), rel=1e-9)
    attn, kv = first("self_attn.attn", "vllm::unified_attention_with_output"), first("self_attn.attn", "vllm::unified_kv_cache_update")
    dec = att[(att["batch_size"] == 4) & (att["kv_cache_size"] == 1024) & (att["prefill_chunk_size"] == 0)].iloc[0]
    assert dec["time_stats.attn_decode.median"] == pytest.approx(
        pred.attention(attn, Batch((1024,) * 4, (1,) * 4)).us / 1e3, rel=1e-9)
    assert dec["time_stats.attn_kv_cache_save.median"] == pytest.approx(pred.latency(kv, {"num_tokens": 4}).us / 1e3)
    pre = att[(att["prefill_chunk_size"] == 128) & (att["kv_cache_size"] == 256)].iloc[0]
    assert pre["time_stats.attn_prefill.median"] == pytest.approx(pred.attention(attn, Batch((256,), (128,))).us / 1e3)

    # a whole 128-token prefill step: layers x (Vidur's per-layer ops) + embedding + the ops Vidur has no
    # place for (final norm, logits) is dooly's own step prediction; nothing lost, nothing counted twice
    first_chunk = att[(att["prefill_chunk_size"] == 128) & (att["kv_cache_size"] == 0)].iloc[0]
    per_layer = sum(mlp.loc[128, f"time_stats.{c}.median"] for c in MLP_TARGETS) + \
        first_chunk["time_stats.attn_prefill.median"] + first_chunk["time_stats.attn_kv_cache_save.median"]
    outside = at(128, lambda m: m.startswith(("model.norm", "logits_processor")))
    step = predict_step(tiny_llama_trace, pred, Batch((0,), (128,)), overhead=False).us / 1e3
    assert 4 * per_layer + mlp.loc[128, "time_stats.emb.median"] + outside == pytest.approx(step, rel=1e-9)
    names = {(x["module"], x["op"]) for x in exported.manifest["not_represented"]}
    assert ("logits_processor", "_C::onednn_mm") in names and ("model.norm", "aten::rsqrt") in names


def test_bad_inputs_fail_cleanly(profiled, tmp_path):
    from dooly.export import export_vidur

    db, _ = profiled
    out = tmp_path / "parent" / "export"
    cases = [(("dooly/no-such-model",), {"db": db.url}, "unknown model"),
             ((MODEL,), {"db": f"sqlite:///{tmp_path}/absent.db"},
              f"fill it with: dooly profile {MODEL} --db sqlite:///{tmp_path}/absent.db"),
             (("dooly/tiny-qwen2",), {"db": db.url}, f"fill it with: dooly profile dooly/tiny-qwen2 --db {db.url}"),
             (("dooly/tiny-mixtral",), {"db": db.url}, "mixture of experts")]
    for args, kwargs, message in cases:
        with pytest.raises(DoolyError, match=re.escape(message)):
            export_vidur(*args, out, **kwargs)
        assert not (tmp_path / "parent").exists()  # nothing written, not even a temporary folder
    out.mkdir(parents=True)
    (out / "mine.txt").write_text("keep")
    with pytest.raises(DoolyError, match="not an empty folder"):
        export_vidur(MODEL, out, db=db.url)
    assert [p.name for p in out.parent.iterdir()] == ["export"] and (out / "mine.txt").read_text() == "keep"

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "dooly.cli", "export", "vidur", "dooly/tiny-qwen2", "--out",
                        str(tmp_path / "cli"), "--db", db.url], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "cli").exists()
    assert f"dooly profile dooly/tiny-qwen2 --db {db.url}" in r.stderr.strip().splitlines()[-1]


def test_vidur_gets_the_limits_the_engine_uses(profiled, tmp_path):
    """Regression: the export wrote the raw max_num_seqs where the engine (and `dooly simulate`) use
    the value vLLM resolves (its default, 256, lowered to the token budget)."""
    from dooly.deployment import Deployment
    from dooly.export import export_vidur
    from dooly.records import EngineOptions
    from dooly.sim.run import make_scheduler

    db, _ = profiled
    options = EngineOptions(max_num_batched_tokens=128)  # max_num_seqs: vLLM's default
    res = export_vidur(MODEL, tmp_path / "export", db=db.url, options=options)
    args = res.manifest["vidur"]["args"]
    flag = dict(zip(args[::2], args[1::2]))
    simulated = make_scheduler(Deployment.resolve(MODEL, options=options))
    assert options.max_num_seqs is None and simulated.max_active == 128
    assert flag["--sarathi_scheduler_config_batch_size_cap"] == str(simulated.max_active)
    assert flag["--random_forrest_execution_time_predictor_config_prediction_max_batch_size"] == "128"
    assert flag["--cache_config_num_blocks"] == str(simulated.num_blocks)
