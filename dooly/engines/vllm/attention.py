"""vLLM attention as the engine runs it: layer, paged KV cache, block table and metadata from vLLM.

`AttentionRig` builds one `Attention` layer the way a model builds it (from the engine config of
the model being profiled), asks it for its KV-cache spec, allocates the paged cache in the backend's
own shape and binds it with vLLM's `bind_kv_cache_to_layers`, fills vLLM's `BlockTable` for a batch
composition, lets the block table compute the slot mapping, and has the backend's own metadata
builder build the attention metadata. The two leaf ops the traced model runs
(`vllm::unified_kv_cache_update`, `vllm::unified_attention_with_output`) are then called exactly as
the layer calls them, under vLLM's forward context.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from dooly.engines.vllm import VllmEngine
from dooly.engines.vllm.setup import engine_config, worker_context, write_model_dir
from dooly.profile.batches import ATTENTION_GRIDS, KV_UPDATE_TOKENS, batch_of
from dooly.records import Batch
from dooly.errors import DoolyError

LAYER = "model.layers.0.self_attn.attn"
KV_BUDGET_BYTES = 3 << 29  # 1.5 GiB of paged KV cache at most


def available_backends() -> list[str]:
    from vllm.platforms import current_platform

    return ["CPU_ATTN"] if current_platform.is_cpu() else ["FLASH_ATTN", "FLASHINFER", "TRITON_ATTN"]


def kv_cache_dtypes(backend: str | None = None) -> list[str]:
    """The KV-cache dtypes `backend` (default: this platform's first) declares it supports."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    name = backend or available_backends()[0]
    return list(AttentionBackendEnum[name].get_class().supported_kv_cache_dtypes)


class AttentionRig:
    def __init__(self, config: dict, dtype: str = "bfloat16", backend: str | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 4096, max_model_len: int | None = None,
                 num_blocks: int | None = None, kv_cache_dtype: str | None = None):
        from vllm.model_executor.layers.attention.attention import Attention
        from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts, resolve_kv_cache_layout
        from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec, KVCacheTensor
        from vllm.v1.worker.block_table import BlockTable
        from vllm.v1.worker.utils import allocate_kv_cache, bind_kv_cache_to_layers

        if backend is not None and backend not in available_backends():
            raise DoolyError(f"attention backend {backend!r} is not available here; available: "
                             f"{', '.join(available_backends())}")
        one_layer = {**config, "num_hidden_layers": 1}
        kwargs = {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
                  "enable_prefix_caching": False}
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if backend:
            kwargs["attention_backend"] = backend
        if kv_cache_dtype and kv_cache_dtype != "auto":  # the layer and its cache spec follow the engine's config
            kwargs["kv_cache_dtype"] = kv_cache_dtype
        with tempfile.TemporaryDirectory(prefix="dooly-attn-") as tmp:
            self.cfg = engine_config(write_model_dir(one_layer, Path(tmp)), dtype, **kwargs)
        cfg = self.cfg
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_size = config.get("head_dim") or config["hidden_size"] // heads
        window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
        self.dtype = cfg.model_config.dtype
        self.block_size = cfg.cache_config.block_size
        self.max_model_len = cfg.model_config.max_model_len
        with worker_context(cfg):
            cfg.compilation_config.static_forward_context.clear()
            self.layer = Attention(heads, head_size, head_size ** -0.5, num_kv_heads=kv_heads,
                                   cache_config=cfg.cache_config, per_layer_sliding_window=window, prefix=LAYER)
            spec = self.layer.get_kv_cache_spec(cfg)
            blocks_per_req = math.ceil(self.max_model_len / self.block_size)
            # room for max_num_seqs full-length requests, within a memory budget
            budget = max(blocks_per_req + 1, KV_BUDGET_BYTES // spec.page_size_bytes)
            self.num_blocks = num_blocks or min(max_num_seqs * blocks_per_req + 1, budget)
            backend_cls = self.layer.attn_backend
            # what the engine core and the worker do: resolve the layout, allocate, bind
            layout = resolve_kv_cache_layout(cfg, [[x.name for x in get_supported_kv_cache_layouts([backend_cls])]], [spec])
            cfg.cache_config.kv_cache_layout = layout.name
            page = spec.page_size_bytes
            kvc = KVCacheConfig(num_blocks=self.num_blocks,
                                kv_cache_tensors=[KVCacheTensor(size=page * self.num_blocks, layers=[LAYER],
                                                                layer_stride=page * self.num_blocks,
                                                                block_stride=page)],
                                kv_cache_groups=[KVCacheGroupSpec([LAYER], spec)])
            caches = allocate_kv_cache(kvc, torch.device("cpu"), layout, [self.block_size])
            self.kv_cache = caches[LAYER]
            bind_kv_cache_to_layers(caches, cfg.compilation_config.static_forward_context)
            self.builder = backend_cls.get_builder_cls()(spec, [LAYER], cfg, torch.device("cpu"))
            self.block_table = BlockTable(self.block_size, max_num_seqs, blocks_per_req, max_num_batched_tokens,
                                          False, torch.device("cpu"), 1)
        self.heads, self.kv_heads, self.head_size, self.window = heads, kv_heads, head_size, window
        self.backend = self.layer.attn_backend.get_name()

    def blocks_needed(self, batch: Batch) -> int:
        return sum(math.ceil(s / self.block_size) for s in batch.seq_lens)

    def metadata(self, batch: Batch, copy: int = 0):
        """vLLM's attention metadata (and slot mapping) for `batch`, blocks assigned in request order.

        `copy` k places the batch's blocks after k other copies' blocks, so that rotating copies
        reads KV data from distinct memory (as a forward pass over many layers does).
        """
        from vllm.config import set_current_vllm_config
        from vllm.v1.attention.backend import CommonAttentionMetadata

        n = len(batch.query_lens)
        seq_lens = batch.seq_lens
        need = [math.ceil(s / self.block_size) for s in seq_lens]
        if (copy + 1) * sum(need) + 1 > self.num_blocks:
            raise DoolyError(f"batch needs {(copy + 1) * sum(need)} KV blocks, the rig has {self.num_blocks - 1}")
        if max(seq_lens) > self.max_model_len:
            raise DoolyError(f"sequence of {max(seq_lens)} tokens exceeds max_model_len {self.max_model_len}")
        start = 1 + copy * sum(need)  # block 0 is vLLM's null block
        for i, k in enumerate(need):
            self.block_table.add_row(list(range(start, start + k)), i)
            start += k
        self.block_table.commit_block_table(n)
        qsl = torch.zeros(n + 1, dtype=torch.int32)
        qsl[1:] = torch.cumsum(torch.tensor(batch.query_lens, dtype=torch.int32), 0)
        positions = torch.cat([torch.arange(c, c + q, dtype=torch.int64)
                               for c, q in zip(batch.context_lens, batch.query_lens)])
        with set_current_vllm_config(self.cfg):
            self.block_table.compute_slot_mapping(n, qsl, positions)
            # the block table's buffers are reused for the next batch: keep this batch's own copies
            slot_mapping = self.block_table.slot_mapping.gpu[: batch.num_tokens].clone()
            common = CommonAttentionMetadata(
                query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                num_reqs=n, num_actual_tokens=batch.num_tokens, max_query_len=max(batch.query_lens),
                max_seq_len=max(seq_lens), block_table_tensor=self.block_table.get_device_tensor(n).clone(),
                slot_mapping=slot_mapping, positions=positions)
            return self.builder.build(0, common), slot_mapping

    def calls(self, batch: Batch, q=None, k=None, v=None, copy: int = 0):
        """(kv_update, attention, output): the layer's two leaf ops, ready to call for `batch`."""
        from vllm.forward_context import set_forward_context
        from vllm.utils.torch_utils import LayerName

        md, slots = self.metadata(batch, copy)
        n = batch.num_tokens
        q = q if q is not None else torch.randn(n, self.heads, self.head_size).to(self.dtype)
        k = k if k is not None else torch.randn(n, self.kv_heads, self.head_size).to(self.dtype)
        v = v if v is not None else torch.randn(n, self.kv_heads, self.head_size).to(self.dtype)
        out = torch.empty(n, self.heads, self.head_size, dtype=self.dtype)
        name = LayerName(LAYER)
        cfg = self.cfg

        def ctx():
            return set_forward_context({LAYER: md}, cfg, num_tokens=n, slot_mapping={LAYER: slots})

        def kv_update():
            with ctx():
                return torch.ops.vllm.unified_kv_cache_update(k, v, name)

        dep = torch.empty(0, dtype=self.dtype)  # the layer passes the KV update's (empty) result along

        def attention():
            with ctx():
                torch.ops.vllm.unified_attention_with_output(q, k, v, out, name, None, None, dep)
            return out

        return kv_update, attention, out


# -- profiling: grids of batch compositions and timed calls ------------------------------------------

ATTENTION_OP, KV_UPDATE_OP = VllmEngine.attention_op, VllmEngine.kv_write_op
STATEFUL_OPS = (ATTENTION_OP, KV_UPDATE_OP)

def stateful_points(op: str, grid: str, max_num_batched_tokens: int, max_num_seqs: int,
                    max_model_len: int, kv_token_budget: int) -> list[dict[str, int]]:
    """Grid points for a stateful op, inside the engine limits and the profiler's KV budget."""
    if op == KV_UPDATE_OP:
        return [{"num_tokens": n} for n in KV_UPDATE_TOKENS[grid] if n <= max_num_batched_tokens]
    g = ATTENTION_GRIDS[grid]
    out = []
    for b in g["dec_reqs"]:
        for kv in g["dec_kv"]:
            if b <= max_num_seqs and b <= max_num_batched_tokens and kv <= max_model_len and b * kv <= kv_token_budget:
                out.append({"dec_reqs": b, "dec_kv": kv})
    for c in g["pre_chunk"]:
        for p in g["pre_ctx"]:
            if c <= max_num_batched_tokens and c + p <= min(max_model_len, kv_token_budget):
                out.append({"pre_chunk": c, "pre_ctx": p})
    for b in g["mixed_reqs"]:
        for kv in g["mixed_kv"]:
            for c in g["mixed_chunk"]:
                if (b + 1 <= max_num_seqs and b + c <= max_num_batched_tokens and kv <= max_model_len
                        and b * kv + c <= kv_token_budget):
                    out.append({"dec_reqs": b, "dec_kv": kv, "pre_chunk": c, "pre_ctx": 0})
    return out


def rig_config(model_config: dict, attrs: dict) -> dict:
    """The model's config with the attention layer's per-rank head layout (tp shards heads)."""
    cfg = dict(model_config)
    cfg["num_attention_heads"] = attrs["num_heads"]
    cfg["num_key_value_heads"] = attrs["num_kv_heads"]
    cfg["head_dim"] = attrs["head_size"]
    cfg["hidden_size"] = attrs["num_heads"] * attrs["head_size"]
    if attrs.get("sliding_window") is None:
        cfg.pop("sliding_window", None)
    return cfg


class StatefulProfiler:
    """Builds (and caches) one rig per attention layout and hands out timed calls per grid point."""

    def __init__(self, dtype: str, max_num_batched_tokens: int, max_num_seqs: int):
        self.dtype = dtype
        self.limits = (max_num_batched_tokens, max_num_seqs)
        self.rigs: dict[tuple, AttentionRig] = {}

    def rig(self, model_config: dict, attrs: dict) -> AttentionRig:
        key = tuple(sorted((k, str(v)) for k, v in attrs.items()))
        if key not in self.rigs:
            from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop

            _set_torch_accelerator_to_noop()  # what the CPU model runner does before running kernels
            self.rigs.clear()  # one rig (one KV cache) alive at a time
            tokens, seqs = self.limits
            self.rigs[key] = AttentionRig(rig_config(model_config, attrs), self.dtype, attrs.get("backend"),
                                          max_num_seqs=max(seqs, 1) + 1, max_num_batched_tokens=tokens,
                                          kv_cache_dtype=attrs.get("kv_cache_dtype"))
        return self.rigs[key]

    def make_call(self, op: str, model_config: dict, attrs: dict, point: dict[str, int]):
        """A factory of fresh copies of the timed call; each copy uses its own KV blocks."""
        from dooly.profile.replay import Call

        rig = self.rig(model_config, attrs)
        batch = batch_of(point)
        per_copy = rig.blocks_needed(batch)
        max_copies = max(1, (rig.num_blocks - 1) // per_copy)
        state = {"copy": 0}
        page = rig.kv_cache.element_size() * rig.kv_cache[0].numel() if rig.kv_cache.dim() else 0

        def factory():
            copy = state["copy"] % max_copies
            state["copy"] += 1
            update, attention, _ = rig.calls(batch, copy=copy)
            fn = update if op == KV_UPDATE_OP else attention
            return Call(fn, [], {}, nbytes=per_copy * page)

        return factory


def kv_token_budget(attrs: dict, dtype: str) -> int:
    """Tokens of KV cache an AttentionRig for this layout holds (the same budget the rig applies)."""
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    kv = attrs.get("kv_cache_dtype") or "auto"
    itemsize = STR_DTYPE_TO_TORCH_DTYPE[dtype if kv == "auto" else kv].itemsize  # vLLM's own name -> dtype
    block = attrs.get("block_size") or 128
    page = block * 2 * attrs["num_kv_heads"] * attrs["head_size"] * itemsize
    return max(1, KV_BUDGET_BYTES // page - 1) * block
