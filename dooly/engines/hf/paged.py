"""transformers' continuous batching KV cache, as `generate_batch` drives it, for one layer.

`PagedRig` builds transformers' own `PagedAttentionCache` (pages of `page_size` tokens) and
`ContinuousBatchingIOs` for a one-layer copy of the model's config, admits requests the way the
scheduler does (`RequestState`, `PagedAttentionCache.can_store_request_tokens`) and has the IOs
prepare a step (`prepare_batch_tensors`, `get_model_kwargs`): read/write indices, cumulative
lengths and, when asked, the attention mask. `update` is then transformers' `PagedAttentionCache
.update` on those kwargs, exactly as an attention layer calls it.

Profiling (the engine's `stateful` interface): the traced leaf ops `dooly::hf_paged_kv_write`
(a step that reads no cache) and `dooly::hf_paged_kv_update` (writes, then reads every token of the
step's requests back) are timed through a rig, over batch compositions (`dooly.profile.batches`).
A one-layer cache holds each page of a request contiguously, as the model's cache does; only the
distance between a request's pages (the other layers' pages) differs.
"""

from __future__ import annotations

import itertools
import math

import torch

from dooly.errors import DoolyError
from dooly.profile.batches import ATTENTION_GRIDS, KV_UPDATE_TOKENS, batch_of
from dooly.records import Batch

KV_WRITE_OP = "dooly::hf_paged_kv_write"
KV_UPDATE_OP = "dooly::hf_paged_kv_update"
STATEFUL_OPS = (KV_WRITE_OP, KV_UPDATE_OP)
KV_BUDGET_BYTES = 3 << 29  # 1.5 GiB of paged KV cache at most
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def paged_cache(config, dtype: torch.dtype, num_blocks: int, max_batch_tokens: int, page_size: int | None = None):
    """transformers' PagedAttentionCache for a model config, sized as continuous batching sizes it."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.cache import PagedAttentionCache
    from transformers.generation.continuous_batching.distributed import DistributedHelper
    from transformers.generation.continuous_batching.initialization import resolve_continuous_batching_config

    cb = ContinuousBatchingConfig(num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
                                  **({"page_size": page_size} if page_size else {}))
    cb = resolve_continuous_batching_config(config, cb, None, has_logit_processors=False)
    return PagedAttentionCache(config, cb, "cpu", DistributedHelper(None, None), dtype), cb


class PagedRig:
    """One layer's paged KV cache and the step kwargs transformers prepares for it."""

    def __init__(self, config: dict, dtype: torch.dtype, num_blocks: int, max_batch_tokens: int,
                 page_size: int | None = None, attention_mask: bool = False):
        from transformers import LogitsProcessorList
        from transformers.generation.continuous_batching.cb_logits_processors import (
            ContinuousBatchingLogitsProcessorList)
        from transformers.generation.continuous_batching.input_outputs import ContinuousBatchingIOs

        from dooly.engines.hf.tracer import build_config

        cfg = build_config({**config, "num_hidden_layers": 1})
        if attention_mask:  # the IOs then build masks too ([max_batch_tokens, capacity]: small rigs only)
            cfg._attn_implementation = "sdpa"
        self.cache, cb = paged_cache(cfg, dtype, num_blocks, max_batch_tokens, page_size)
        if list(self.cache.cache_allocators) != ["full_attention"]:
            raise DoolyError("paged profiling covers full-attention layers only")
        self.page_size = self.cache.cache_allocators["full_attention"].tokens_per_page
        self.logits = ContinuousBatchingLogitsProcessorList(LogitsProcessorList())
        self.ios = ContinuousBatchingIOs(self.cache, cfg, cb, torch.device("cpu"), dtype, self.logits)
        self.states: dict = {}  # request id -> transformers' RequestState

    @property
    def capacity_tokens(self) -> int:
        return self.cache.num_blocks * self.page_size

    def step(self, batch: Batch, ids: list[str]) -> dict:
        """Model kwargs of a step computing `batch` for requests `ids`, as the IOs prepare them.

        A request seen for the first time has its `context_lens` tokens counted as already cached
        (their blocks are allocated, contents as they are); a known request continues where it is.
        """
        from transformers.generation.continuous_batching.requests import FutureRequestState, RequestState

        futures = []
        for rid, ctx, q in zip(ids, batch.context_lens, batch.query_lens):
            state = self.states.get(rid)
            if state is None:
                state = RequestState(request_id=rid, initial_tokens=[0] * (ctx + q), max_new_tokens=1)
                state.position_offset = ctx
                self.states[rid] = state
            elif state.position_offset != ctx:
                raise DoolyError(f"request {rid} has {state.position_offset} cached tokens, not {ctx}")
            state.tokens_to_process = [0] * q
            if not self.cache.can_store_request_tokens(state, q):
                raise DoolyError(f"the paged KV cache ({self.capacity_tokens} tokens) is full")
            futures.append(FutureRequestState(state, has_new_token=True, complete_blocks={}, query_length=q))
        self.ios.prepare_batch_tensors(futures, self.logits, use_decode_fast_path=False,
                                       num_q_tokens=batch.num_tokens, max_kv_read=sum(batch.context_lens),
                                       use_padding=False)
        return _owned(self.ios.get_model_kwargs())

    def update(self, key: torch.Tensor, value: torch.Tensor, kwargs: dict):
        """transformers' cache update of layer 0: key/value [1, kv_heads, num_tokens, head_dim]."""
        return self.cache.update(key, value, 0, dict(kwargs))  # update rewrites some of its kwargs

    def reset(self) -> None:
        self.cache.reset()
        self.states.clear()


def _owned(x):
    """The IOs hand out views of buffers they reuse for the next step: keep this step's own copy."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: _owned(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_owned(v) for v in x]
    return x


# -- profiling: grids of batch compositions and timed calls ------------------------------------------

def stateful_points(op: str, grid: str, max_num_batched_tokens: int, max_num_seqs: int,
                    max_model_len: int, kv_token_budget: int) -> list[dict[str, int]]:
    """Batch compositions for a paged KV op, inside the engine limits and the rig's KV budget."""
    if op == KV_WRITE_OP:  # fresh prefills: the cost is the write of num_tokens tokens
        return [{"num_tokens": n} for n in KV_UPDATE_TOKENS[grid] if n <= max_num_batched_tokens]
    g = ATTENTION_GRIDS[grid]
    out = [{"dec_reqs": b, "dec_kv": kv} for b in g["dec_reqs"] for kv in g["dec_kv"]
           if b <= min(max_num_seqs, max_num_batched_tokens) and kv <= max_model_len and b * kv <= kv_token_budget]
    out += [{"pre_chunk": c, "pre_ctx": p} for c in g["pre_chunk"] for p in g["pre_ctx"]
            if p > 0 and c <= max_num_batched_tokens and c + p <= min(max_model_len, kv_token_budget)]
    out += [{"dec_reqs": b, "dec_kv": kv, "pre_chunk": c, "pre_ctx": 0}
            for b in g["mixed_reqs"] for kv in g["mixed_kv"] for c in g["mixed_chunk"]
            if b + 1 <= max_num_seqs and b + c <= max_num_batched_tokens and kv <= max_model_len
            and b * kv + c <= kv_token_budget]
    return out


def _token_bytes(attrs: dict, dtype: str) -> int:
    """Bytes of one token's keys and values in one layer."""
    return 2 * attrs["num_kv_heads"] * attrs["head_size"] * _DTYPES[dtype].itemsize


def kv_token_budget(attrs: dict, dtype: str) -> int:
    """Tokens of KV cache a rig for this layout holds."""
    page = attrs["page_size"]
    return max(1, KV_BUDGET_BYTES // (page * _token_bytes(attrs, dtype))) * page


class StatefulProfiler:
    """Builds (and keeps) one rig per KV layout and hands out timed cache updates per grid point."""

    def __init__(self, dtype: str, max_num_batched_tokens: int, max_num_seqs: int):
        self.dtype = dtype
        self.max_tokens = max_num_batched_tokens
        self.rigs: dict[tuple, PagedRig] = {}

    def rig(self, model_config: dict, attrs: dict) -> PagedRig:
        key = tuple(sorted((k, str(v)) for k, v in attrs.items()))
        if key not in self.rigs:
            self.rigs.clear()  # one rig (one KV cache) alive at a time
            page = attrs["page_size"]
            self.rigs[key] = PagedRig(model_config, _DTYPES[self.dtype], kv_token_budget(attrs, self.dtype) // page,
                                      self.max_tokens, page)
        return self.rigs[key]

    def make_call(self, op: str, model_config: dict, attrs: dict, point: dict[str, int]):
        """A factory of fresh copies of the timed update; each copy's requests own their KV blocks."""
        from dooly.profile.replay import Call

        rig = self.rig(model_config, attrs)
        rig.reset()
        batch = batch_of(point)  # a write point ({"num_tokens": n}) is one fresh prefill
        max_copies = max(1, rig.cache.num_blocks // sum(math.ceil(s / rig.page_size) for s in batch.seq_lens))
        steps: list = []  # each copy's step kwargs (its own requests, its own blocks)
        shape = (1, attrs["num_kv_heads"], batch.num_tokens, attrs["head_size"])
        dt = _DTYPES[self.dtype]
        counter = itertools.count()

        def factory():
            i = next(counter)
            if i < max_copies:
                steps.append(rig.step(batch, [f"{i}.{r}" for r in range(len(batch.query_lens))]))
            key, value = torch.randn(shape).to(dt), torch.randn(shape).to(dt)
            return Call(rig.update, [key, value, steps[i % max_copies]], {},
                        nbytes=sum(batch.seq_lens) * _token_bytes(attrs, self.dtype))

        return factory
