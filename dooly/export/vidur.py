"""Vidur profile files filled from dooly's predictors (`dooly export vidur`).

Vidur (microsoft/vidur; PyPI `vidur`, run here with 0.0.26) models an engine step as per-layer ops
times the number of layers. Its sklearn predictor (vidur/execution_time_predictor/
sklearn_execution_time_predictor.py) reads, per (device, model):

  mlp.csv        a row per num_tokens: time_stats.<op>.median (ms) of attn_pre_proj, attn_post_proj,
                 mlp_up_proj, mlp_down_proj, mlp_act, input_layernorm, post_attention_layernorm,
                 attn_rope, add; rows selected by n_head, n_kv_head, n_embd, n_expanded_embd,
                 vocab_size, use_gated_mlp, num_tensor_parallel_workers
  attention.csv  a row per attention batch: one prefill chunk (batch_size 1, prefill_chunk_size after
                 kv_cache_size cached tokens) or batch_size decodes at kv_cache_size;
                 time_stats.attn_prefill / attn_decode / attn_kv_cache_save .median (ms); rows
                 selected by n_embd, n_q_head, n_kv_head, block_size, num_tensor_parallel_workers
  all_reduce.csv a row per all-reduce size (network dataset, read only at TP > 1): num_workers,
                 devices_per_node, collective, size (bytes, 2 per element as Vidur converts them back
                 to tokens), time_stats.all_reduce.median (ms) of one all-reduce of [num_tokens, hidden]
                 between the workers, as dooly measured them between real ranks
  send_recv.csv  pipeline-parallel transfers (PP > 1): not written, dooly does not model PP

A value here is dooly's prediction at that point: over the traced ops that make up the Vidur op in
every layer, the sum of count x predicted latency, divided by the number of layers (at TP > 1 the
ops are one rank's shards, and an all-reduce row is the mean of the model's per-layer all-reduces). The rows are the
points Vidur's own profiler measures (vidur/profiling/utils), within the engine's limits.

The PyPI release loads profiles only through `huggingface_hub.snapshot_download`, which with
HF_HUB_OFFLINE=1 resolves a local Hugging Face cache; so OUT is laid out as one and is passed as
Vidur's cache_dir (Vidur also stores its fitted regressors there):

  OUT/profiling_data/compute/datasets--dooly--<slug>/snapshots/<sha1>/{config.json,mlp.csv.xz,attention.csv.xz}
  OUT/profiling_data/network/datasets--dooly--<slug>-net/snapshots/<sha1>/{config.json,all_reduce.csv.xz (TP > 1)}
  OUT/data/profiling/compute/<device>/<model>/{mlp,attention}.csv  (microsoft/vidur source-tree layout)
  OUT/data/profiling/network/<device>/all_reduce.csv  (TP > 1)
  OUT/vidur_launch.py        registers the model and device with Vidur, then runs vidur.main
  OUT/manifest.json, README.md  which ops filled each column, what was extrapolated, what was not filled
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dooly.deployment import Deployment
from dooly.engine_interface import get_engine
from dooly.errors import DoolyError
from dooly.records import DEFAULT_OPTIONS, EngineOptions, quantization_name

VIDUR_VERSION = "0.0.26"  # the PyPI release bench/vidur_dropin.py runs these files with
KV_GRANULARITY = 256  # Vidur 0.0.26's default kv_cache_prediction_granularity

# Columns Vidur's predictor reads (sklearn_execution_time_predictor.py: _load_compute_df,
# _load_attention_df, _train_general_models, _train_attention_layer_models).
MLP_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj", "mlp_act", "input_layernorm",
           "post_attention_layernorm", "attn_rope", "add")
ATTENTION_OPS = ("attn_prefill", "attn_decode", "attn_kv_cache_save")
MLP_KEYS = ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "use_gated_mlp", "num_tokens",
            "num_tensor_parallel_workers")
ATTENTION_KEYS = ("n_embd", "n_q_head", "n_kv_head", "block_size", "num_tensor_parallel_workers", "max_model_len",
                  "batch_size", "prefill_chunk_size", "kv_cache_size", "is_prefill", "attention_backend")
PROFILER_STATS = (
    "min",
    "max",
    "mean",
    "std",
)  # Vidur's profiler also writes these per op; its predictor does not read them

# vLLM decoder-layer submodule -> Vidur op
LAYER_MODULES = {
    "input_layernorm": "input_layernorm",
    "self_attn.qkv_proj": "attn_pre_proj",
    "self_attn.rotary_emb": "attn_rope",
    "self_attn.o_proj": "attn_post_proj",
    "post_attention_layernorm": "post_attention_layernorm",
    "mlp.gate_up_proj": "mlp_up_proj",
    "mlp.act_fn": "mlp_act",
    "mlp.down_proj": "mlp_down_proj",
}
REQUIRED = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj", "mlp_act", "attention",
            "attn_kv_cache_save")
_LAYER = re.compile(r"(?:^|\.)layers\.\d+\.(.+)$")


def vidur_op(op) -> str | None:
    """The Vidur op a traced op is part of ("attention": the kernel behind both attn_prefill and
    attn_decode; "emb": the embedding, which Vidur's profiler records and its predictor ignores);
    None where Vidur's step model has no place for it."""
    from dooly.records import COLLECTIVE

    engine = get_engine("vllm")

    m = _LAYER.search(op.module)
    if m is None:
        return "emb" if op.module.endswith("embed_tokens") else None
    if engine.classify(op.op, op.attrs) == COLLECTIVE:  # inside o_proj / down_proj: Vidur's own all-reduce term
        return "all_reduce" if "allreduce" in op.op.replace("_", "") else None
    if m.group(1) == "self_attn.attn":
        return {engine.attention_op: "attention", engine.kv_write_op: "attn_kv_cache_save"}.get(op.op)
    if op.op == "aten::add.Tensor" and [a.dims for a in op.args[:2]] == [("num_tokens", "hidden_size")] * 2:
        return "add"  # the residual add, which vLLM runs inside its fused add + RMSNorm module
    return LAYER_MODULES.get(m.group(1))


@dataclass(frozen=True)
class Part:
    """All executions (over every layer) of one signature that make up part of a Vidur op."""

    vidur_op: str
    signature: str
    op: str
    module: str  # layers.N folded to layers.*
    count: int


def split_trace(trace) -> tuple[dict[str, list[Part]], list[dict]]:
    """(Vidur op -> its parts, ops with no Vidur column as {module, op, count})."""
    from dooly.records import FREE
    from dooly.trace.records import fold_layers

    parts, other = Counter(), Counter()
    for op in trace.ops:
        if get_engine(trace.engine).classify(op.op, op.attrs) == FREE:
            continue
        name = vidur_op(op)
        if name is None:
            other[(fold_layers(op.module), op.op)] += 1
        else:
            parts[(name, op.signature, op.op, fold_layers(op.module))] += 1
    by_op: dict[str, list[Part]] = {}
    for (name, sig, op, module), n in parts.items():
        by_op.setdefault(name, []).append(Part(name, sig, op, module, n))
    return by_op, [{"module": m or "(outside modules)", "op": o, "count": n} for (m, o), n in sorted(other.items())]


# -- Vidur's profiling grids (vidur/profiling/utils/__init__.py), limited by the engine -------------

def _upto(space, limit, strict=False) -> list[int]:
    return sorted({x for x in space if (x < limit if strict else x <= limit)})


def num_tokens_points(max_tokens: int) -> list[int]:
    """get_num_tokens_to_profile: the num_tokens rows of mlp.csv."""
    space = [1, 2, 4, *range(8, 1024, 8), *range(1024, 2049, 16), *range(2048, 4097, 32), *range(4096, 8193, 64),
             *range(8192, 16385, 128), *range(16384, 32769, 256), *range(32768, 65537, 512),
             *range(65536, 131073, 1024)]
    return _upto(space, max_tokens)


def attention_points(max_seq_len: int, max_chunk: int, max_batch: int) -> list[tuple[int, int, int]]:
    """get_attention_input_combinations: (prefill_chunk_size, kv_cache_size, batch_size) rows of
    attention.csv; prefill_chunk_size 0 marks a decode batch."""
    chunks = _upto([*range(32, 129, 32), *range(256, 1025, 128), *range(1024, 8193, 512)], min(max_seq_len, max_chunk))
    seq_lens = _upto([*range(0, 1025, 32), *range(1024, 4097, 64), *range(4096, 65537, 256),
                      *range(65536, 524289, 1024), *range(524288, 4194305, 4096)], max_seq_len, strict=True)
    batches = _upto([*range(1, 129), *range(128, 1025, 8)], max_batch)
    rows = {(c, i * c, 1) for c in chunks for i in range(max_seq_len // c)}  # chunked prefills
    if max_seq_len <= max_chunk:
        rows |= {(s, 0, 1) for s in seq_lens if s > 0}  # whole prefills
    rows |= {(0, kv, b) for kv in seq_lens if kv > 0 for b in batches}  # decodes
    return sorted(r for r in rows if r[0] + r[1] <= max_seq_len)


# -- the model and device as Vidur describes them -----------------------------------------------------

def vidur_model_config(name: str, config: dict, max_model_len: int) -> dict:
    """Fields of Vidur's BaseModelConfig (vidur/config/model_config.py) for a dense Llama-like model."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    problems = []
    if heads * head_dim != config["hidden_size"]:
        problems.append(f"head_dim {head_dim} != hidden_size / num_attention_heads (Vidur derives it so)")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']} (Vidur's gated MLP is SiLU)")
    experts = [k for k in ("num_local_experts", "num_experts", "n_routed_experts") if config.get(k)]
    if experts:
        problems.append(f"mixture of experts ({experts[0]}); Vidur models dense MLPs")
    if problems:
        raise DoolyError(f"{name} cannot be described to Vidur: {'; '.join(problems)}")
    return {"num_layers": config["num_hidden_layers"], "num_q_heads": heads,
            "num_kv_heads": config.get("num_key_value_heads") or heads, "embedding_dim": config["hidden_size"],
            "mlp_hidden_dim": config["intermediate_size"], "max_model_len": max_model_len, "use_gated_mlp": True,
            "use_bias": bool(config.get("mlp_bias", False)),
            "use_qkv_bias": bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
            "activation": "silu", "norm": "rms_norm", "post_attn_norm": True, "vocab_size": config["vocab_size"],
            "rope_theta": config.get("rope_theta"), "partial_rotary_factor": config.get("partial_rotary_factor", 1.0)}


def _slug(text: str) -> str:
    return re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9._-]+", "_", text)).strip("-.")


def _hf_snapshot(root: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """A local Hugging Face cache entry for dataset `repo_id` holding `files` (revision = their sha1)."""
    digest = hashlib.sha1()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name])
    repo = root / f"datasets--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / digest.hexdigest()
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(digest.hexdigest())
    return snap


class Tables:
    """Vidur's two compute tables from one model's parts and a predictor (ms; per layer, emb per step)."""

    def __init__(self, parts: dict[str, list[Part]], predictor, model: str, layers: int):
        self.parts, self.predictor, self.model, self.layers = parts, predictor, model, layers

    def total(self, name: str, predict) -> tuple[float, bool]:
        """(ms, extrapolated) of Vidur op `name`: sum of count x prediction over its parts, per layer."""
        us, extrapolated = 0.0, False
        for p in self.parts.get(name, []):
            pred = predict(p)
            us += p.count * pred.us
            extrapolated |= pred.extrapolated
        return us / (1 if name == "emb" else self.layers) / 1e3, extrapolated

    def _stateless(self, n: int):
        return lambda p: self.predictor.latency(p.signature, {"num_tokens": n}, model_name=self.model, op=p.op)

    def mlp(self, keys: dict, max_tokens: int) -> pd.DataFrame:
        rows = []
        for n in num_tokens_points(max_tokens):
            row = {k: keys[k] for k in MLP_KEYS if k in keys} | {"num_tokens": n}
            for name in (*MLP_OPS, "emb"):
                row[f"time_stats.{name}.median"], row[f"dooly.{name}.extrapolated"] = self.total(
                    name, self._stateless(n)
                )
            rows.append(row)
        return pd.DataFrame(rows)

    def all_reduce(self, tensor_parallel_size: int, hidden: int, max_tokens: int) -> pd.DataFrame:
        """One all-reduce of [num_tokens, hidden] among `tp` workers per row: the mean over the model's
        per-layer all-reduces (Vidur adds one after attention and one after the MLP in every layer)."""
        calls_per_layer = sum(p.count for p in self.parts.get("all_reduce", [])) / self.layers
        rows = []
        for n in num_tokens_points(max_tokens):
            ms, extrapolated = self.total("all_reduce", self._stateless(n))  # per layer
            rows.append(
                {
                    "num_workers": tensor_parallel_size,
                    "devices_per_node": tensor_parallel_size,
                    "collective": "all_reduce",
                    "size": 2 * n * hidden,
                    "time_stats.all_reduce.median": ms / calls_per_layer,
                    "dooly.all_reduce.extrapolated": extrapolated,
                }
            )
        return pd.DataFrame(rows)

    def attention(self, keys: dict, max_len: int, max_tokens: int, max_seqs: int) -> pd.DataFrame:
        from dooly.records import Batch

        rows = []
        for chunk, kv, batch in attention_points(max_len, max_tokens, max_seqs):
            b = Batch((kv,), (chunk,)) if chunk else Batch((kv,) * batch, (1,) * batch)
            row = {k: keys[k] for k in ATTENTION_KEYS if k in keys} | {"batch_size": batch, "prefill_chunk_size": chunk,
                                                               "kv_cache_size": kv, "is_prefill": chunk > 0}
            name = "attn_prefill" if chunk else "attn_decode"
            row[f"time_stats.{name}.median"], row[f"dooly.{name}.extrapolated"] = self.total(
                "attention", lambda p: self.predictor.attention(p.signature, b, model_name=self.model, op=p.op))
            row["time_stats.attn_kv_cache_save.median"], row["dooly.attn_kv_cache_save.extrapolated"] = self.total(
                "attn_kv_cache_save", self._stateless(b.num_tokens))
            rows.append(row)
        columns = [
            f"{x}.{o}.{y}" for o in ATTENTION_OPS for x, y in (("time_stats", "median"), ("dooly", "extrapolated"))
        ]
        return pd.DataFrame(rows)[[*ATTENTION_KEYS, *columns]]


# -- the export ---------------------------------------------------------------------------------------

@dataclass
class VidurExport:
    folder: Path  # OUT
    mlp: pd.DataFrame  # the rows of mlp.csv (plus dooly.<op>.extrapolated flags)
    attention: pd.DataFrame  # the rows of attention.csv (plus flags)
    manifest: dict  # what manifest.json holds
    command: str  # the Vidur command line that uses the files (workload flags to add)
    all_reduce: pd.DataFrame | None = None  # the rows of all_reduce.csv (TP > 1)


def export_vidur(model: str, out, *, db: str | None = None, dtype: str = "bfloat16",
                 options: EngineOptions = DEFAULT_OPTIONS, device: str = "cpu", threads: int | None = None,
                 tensor_parallel_size: int = 1, **engine_options) -> VidurExport:
    """Write Vidur's profile files for `model` on vLLM, filled from the latency database, into `out`.

    Engine options as for `simulate` (`options`, and any of its fields by name on top); the files and
    Vidur's flags carry the values the engine uses (vLLM may lower an option), as `dooly simulate` does.
    At `tensor_parallel_size` K > 1 the files describe one of K workers (the rank's sharded ops, as
    Vidur's profiler measures them per worker) plus all_reduce.csv, from a database profiled with
    `dooly profile MODEL --tp K`."""
    from dooly.db import LatencyDB
    from dooly.db.store import default_url
    from dooly.predict import Predictor
    from dooly.trace import trace_model

    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DoolyError(f"{out} exists and is not an empty folder; choose a new --out")
    if not re.fullmatch(r"[a-z0-9_]+", device):
        raise DoolyError(f"bad device name {device!r}: lowercase letters, digits and _ (a Vidur SKU name)")
    d = Deployment.resolve(model, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                           options=options.replace(**engine_options), threads=threads)
    spec, tensor_parallel_size = d.spec, d.tensor_parallel_size
    max_num_batched_tokens, max_num_seqs = d.max_num_batched_tokens, d.max_num_seqs  # what the engine uses
    url = db or default_url()
    hint = f"dooly profile {spec.name}{f' --tp {tensor_parallel_size}' if tensor_parallel_size > 1 else ''} --db {url}"
    block, max_len, num_blocks = d.block_size, d.max_model_len, d.num_blocks
    vmodel = vidur_model_config(spec.name, spec.config, max_len)
    trace = trace_model(spec, dtype=d.dtype, tensor_parallel_size=tensor_parallel_size, cache=True,
                        **d.options.trace_options())
    parts, unplaced = split_trace(trace)
    missing = [
        name for name in (*REQUIRED, *(("all_reduce",) if tensor_parallel_size > 1 else ())) if name not in parts
    ]
    if missing:
        raise DoolyError(f"{spec.name}: no traced op maps to Vidur's {', '.join(missing)} (modules: "
                         f"{sorted({p.module for ps in parts.values() for p in ps})})")
    env = d.env
    try:
        predictor = Predictor(LatencyDB(url, create=False), env)
        for p in (p for ps in parts.values() for p in ps):
            fitted = predictor.model(p.signature)
            if fitted is None:
                raise DoolyError(f"no measurements for {p.op} ({p.signature[:8]}) of {spec.name} in this environment")
            extra = set(fitted.variables) - {"num_tokens"}
            if extra and p.vidur_op != "attention":
                raise DoolyError(f"{p.op} in {p.module} depends on {', '.join(sorted(extra))}; Vidur's "
                                 f"{p.vidur_op} depends on num_tokens only")
    except DoolyError as e:
        raise e if hint in str(e) else DoolyError(f"{e}; fill it with: {hint}") from None
    keys = {
        "n_head": vmodel["num_q_heads"],
        "n_q_head": vmodel["num_q_heads"],
        "n_kv_head": vmodel["num_kv_heads"],
        "n_embd": vmodel["embedding_dim"],
        "n_expanded_embd": vmodel["mlp_hidden_dim"],
        "vocab_size": vmodel["vocab_size"],
        "use_gated_mlp": True,
        "num_tensor_parallel_workers": tensor_parallel_size,
        "block_size": block,
        "max_model_len": max_len,
        "attention_backend": dict(next(o.attrs for o in trace.ops if vidur_op(o) == "attention")).get("backend", ""),
    }
    tables = Tables(parts, predictor, spec.name, vmodel["num_layers"])
    mlp = tables.mlp(keys, max_num_batched_tokens)
    attention = tables.attention(keys, max_len, max_num_batched_tokens, max_num_seqs)
    all_reduce = (
        tables.all_reduce(tensor_parallel_size, vmodel["embedding_dim"], max_num_batched_tokens)
        if tensor_parallel_size > 1
        else None
    )

    compute_id = f"dooly/{_slug(f'{spec.name}-{device}' + (f'-tp{tensor_parallel_size}' if tensor_parallel_size > 1 else ''))}"
    network_id = f"{compute_id}-net"
    args = vidur_args(spec.name, device, out, compute_id, network_id, block, num_blocks, max_len,
                      max_num_batched_tokens, max_num_seqs, tensor_parallel_size)
    command = ("HF_HUB_OFFLINE=1 WANDB_MODE=disabled python " + str(out / "vidur_launch.py") + " " + " ".join(args)
               + " WORKLOAD_FLAGS")
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    manifest = _manifest(spec.name, trace, env, url, parts, unplaced, mlp, attention, all_reduce, predictor, command)
    manifest["vidur"] = {"version": VIDUR_VERSION, "model_name": spec.name, "model_config": vmodel,
                         "device": device, "device_config": {"fp16_tflops": None, "total_memory_gb": round(ram_gib, 2)},
                         "device_note": "total_memory_gb: this machine's RAM (the CPU engine's device memory); the KV "
                                        "capacity is --cache_config_num_blocks, what dooly simulate gives the engine",
                         "network_device": device, "num_devices_per_node": tensor_parallel_size,
                         "compute_dataset": compute_id, "network_dataset": network_id, "args": args}
    _write(out, spec.name, device, mlp, attention, all_reduce, manifest, compute_id, network_id)
    return VidurExport(out, mlp, attention, manifest, command, all_reduce)


def vidur_args(model, device, out, compute_id, network_id, block, num_blocks, max_len, max_tokens, max_seqs,
               tensor_parallel_size: int = 1) -> list:
    """Vidur flags that read the export and mirror `dooly simulate`'s vLLM set-up."""
    pre = "--random_forrest_execution_time_predictor_config_"  # Vidur's default predictor
    # at TP > 1 the measured all-reduce already holds its launch: no NCCL launch / skew terms on top
    network = [f"{pre}nccl_cpu_launch_overhead_ms", "0", f"{pre}nccl_cpu_skew_overhead_per_device_ms", "0"] \
        if tensor_parallel_size > 1 else []
    return [
        "--replica_config_model_name",
        model,
        "--replica_config_device",
        device,
        "--replica_config_network_device",
        device,
        "--replica_config_tensor_parallel_size",
        str(tensor_parallel_size),
        "--replica_config_num_pipeline_stages",
        "1",
        # the engine's KV cache: its block size and the blocks dooly simulate gives it
        "--cache_config_block_size",
        str(block),
        "--cache_config_num_blocks",
        str(num_blocks),
        # vLLM V1 schedules decodes first, then prefill chunks within a token budget: Vidur's sarathi
        "--replica_scheduler_config_type",
        "sarathi",
        "--sarathi_scheduler_config_chunk_size",
        str(max_tokens),
        "--sarathi_scheduler_config_batch_size_cap",
        str(max_seqs),
        "--execution_time_predictor_config_type",
        "random_forrest",
        f"{pre}model_profiling_dataset",
        compute_id,
        f"{pre}network_profiling_dataset",
        network_id,
        f"{pre}cache_dir",
        str(out),
        # the grid Vidur precomputes (lookups outside it raise KeyError): what the engine can schedule
        f"{pre}prediction_max_tokens_per_request",
        str(math.ceil(max(max_len, max_tokens) / KV_GRANULARITY) * KV_GRANULARITY),
        f"{pre}prediction_max_batch_size",
        str(max_seqs),
        f"{pre}prediction_max_prefill_chunk_size",
        str(max_tokens),
        *network,
    ]


def _manifest(model, trace, env, url, parts, unplaced, mlp, attention, all_reduce, predictor, command) -> dict:
    from dooly.predict.overhead import OVERHEAD_SIG

    def flagged(df, ops):
        return {o: int(df[f"dooly.{o}.extrapolated"].sum()) for o in ops if f"dooly.{o}.extrapolated" in df}

    not_filled = [
        {"what": f"time_stats.<op>.{s} in mlp.csv and attention.csv", "reason":
         "dooly predicts a median per point (it stores median and interquartile range per measurement); "
         "Vidur's predictor reads only .median"} for s in PROFILER_STATS]
    not_filled += [
        {"what": "network send_recv.csv", "reason": "dooly does not model pipeline parallelism; Vidur reads it "
         "only at num_pipeline_stages > 1, so this export is PP = 1"},
        {"what": "device fp16_tflops", "reason": "unknown to dooly; Vidur uses it only for its MFU metric (left NaN)"},
        {"what": "attention rows Vidur's profiler drops for GPU memory", "reason":
         "none dropped: every grid point is predicted (see the extrapolated counts)"}]
    not_represented = [{**u, "reason": "Vidur's step time has no term for ops outside the decoder layers"}
                       for u in unplaced]
    not_represented.append(
        {
            "module": "model.embed_tokens",
            "op": "embedding",
            "count": 1,
            "reason": "written as time_stats.emb.median (as Vidur's profiler does); Vidur's predictor ignores it",
        }
    )
    not_represented.append({"module": "model.layers.*.self_attn.attn", "op": "attn_kv_cache_save", "count":
                            sum(p.count for p in parts["attn_kv_cache_save"]), "reason":
                            "filled, but Vidur 0.0.26 leaves it out of a step's time (ExecutionTime.total_time)"})
    if predictor.model(OVERHEAD_SIG) is not None:
        not_represented.append({"module": "(engine)", "op": "per-step overhead (dooly calibrate)", "count": 1,
                                "reason": "Vidur 0.0.26 has no per-step CPU overhead term"})
    if trace.kv_cache_dtype:
        not_represented.append({"module": "model.layers.*.self_attn.attn", "op": f"KV cache in {trace.kv_cache_dtype}",
                                "count": 1, "reason": "Vidur 0.0.26 has no precision axis: the attention rows are "
                                "this KV dtype's measured kernels and --cache_config_num_blocks is the blocks it "
                                "gives, but Vidur's own memory planning would assume the model dtype"})
    scheme = trace.quantization or quantization_name(trace.config)
    if scheme:
        not_represented.append({"module": "model.layers.*", "op": f"weights quantized ({scheme})", "count": 1,
                                "reason": "Vidur 0.0.26 has no precision axis: the GEMM rows are the quantized "
                                "kernels' measured times (activation quantization included), but Vidur's own memory "
                                "planning would size the weights in the model dtype"})
    if all_reduce is None:
        not_filled.append({"what": "network all_reduce.csv", "reason": "Vidur reads it only at tensor_parallel_size "
                           "> 1; export with --tensor-parallel-size K from a `dooly profile --tp K` database"})
    files = {"mlp.csv": {"rows": len(mlp), "extrapolated_rows": flagged(mlp, (*MLP_OPS, "emb"))},
             "attention.csv": {"rows": len(attention), "extrapolated_rows": flagged(attention, ATTENTION_OPS)}}
    if all_reduce is not None:
        files["all_reduce.csv"] = {"rows": len(all_reduce), "extrapolated_rows": flagged(all_reduce, ("all_reduce",))}
    return {
        "model": model, "engine": "vllm", "engine_version": trace.engine_version, "dtype": trace.dtype,
        "tensor_parallel_size": trace.tensor_parallel_size,
        "database": url, "environment": json.loads(env.to_json()), "environment_key": env.key,
        "files": files,
        "op_map": {name: [{"module": p.module, "op": p.op, "signature": p.signature, "count": p.count}
                          for p in ps] for name, ps in sorted(parts.items())},
        "unmapped_vidur_ops": [o for o in MLP_OPS if o not in parts],
        "not_filled": not_filled, "not_represented": not_represented, "command": command,
    }


def _readme(m: dict) -> str:
    lines = [f"# Vidur profile of {m['model']} on {m['engine_version']} ({m['dtype']}), from dooly",
             "", f"Database: {m['database']} (environment {m['environment_key']}).", "",
             "Run (add workload flags, e.g. --request_generator_config_type trace_replay ...):", "",
             f"    {m['command']}", "", "## Files", ""]
    for f, info in m["files"].items():
        lines.append(f"- {f}: {info['rows']} rows; extrapolated rows per op: {info['extrapolated_rows']}")
    lines += ["", "## Which traced ops fill each Vidur op (summed over layers, divided by the layer count)", ""]
    for name, ps in m["op_map"].items():
        by = Counter()
        for p in ps:
            by[(p["op"], p["module"])] += p["count"]
        lines.append(f"- {name}: " + "; ".join(f"{n}x {op} in {mod}" for (op, mod), n in by.items()))
    for o in m["unmapped_vidur_ops"]:
        lines.append(f"- {o}: no engine op (written as 0)")
    lines += ["", "## Not filled", ""] + [f"- {x['what']}: {x['reason']}" for x in m["not_filled"]]
    lines += ["", "## Engine time Vidur cannot represent", ""]
    by_module: dict[tuple, list] = {}
    for x in m["not_represented"]:
        by_module.setdefault((x["module"], x["reason"]), []).append(f"{x['count']}x {x['op']}")
    lines += [f"- {mod}: {', '.join(ops)} ({reason})" for (mod, reason), ops in by_module.items()]
    return "\n".join(lines) + "\n"


def _write(out: Path, model: str, device: str, mlp, attention, all_reduce, manifest, compute_id, network_id) -> None:
    """Everything into a temporary sibling folder, renamed to `out` at the end: never half an export."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tables = {"mlp.csv": mlp, "attention.csv": attention}
        plain = tmp / "data" / "profiling" / "compute" / device / model
        plain.mkdir(parents=True)
        for name, df in tables.items():
            df.to_csv(plain / name, index=False)
        xz = {}
        for name, df in tables.items():
            buf = io.BytesIO()
            df.to_csv(buf, index=False, compression="xz")
            xz[f"{name}.xz"] = buf.getvalue()
        meta = json.dumps({"model": model, "device_sku": device}).encode()
        _hf_snapshot(tmp / "profiling_data" / "compute", compute_id, {"config.json": meta, **xz})
        network = {"config.json": json.dumps({"sku": device}).encode()}
        if all_reduce is not None:
            plain_net = tmp / "data" / "profiling" / "network" / device
            plain_net.mkdir(parents=True)
            all_reduce.to_csv(plain_net / "all_reduce.csv", index=False)
            buf = io.BytesIO()
            all_reduce.to_csv(buf, index=False, compression="xz")
            network["all_reduce.csv.xz"] = buf.getvalue()
        _hf_snapshot(tmp / "profiling_data" / "network", network_id, network)
        shutil.copyfile(Path(__file__).with_name("vidur_launch.py"), tmp / "vidur_launch.py")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        (tmp / "README.md").write_text(_readme(manifest))
        if out.exists():
            out.rmdir()  # empty (checked before the work)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
