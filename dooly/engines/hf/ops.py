"""Leaf ops for the parts of transformers' attention that fake (symbolic) tensors cannot run through.

Inside `flex_leaves()` / `paged_leaves()` (tracing only; everything is restored on exit) transformers'
own functions are routed through these ops, so the trace records one op with symbolic dims:

  dooly::hf_flex_block_mask(batch, q_len, kv_len)          transformers' `flex_attention_mask`
      (create_block_mask, compiled) for a causal mask whose last query sits at the last key.
  dooly::hf_flex_attention(q [b, h, q_len, d], k [b, kv_h, kv_len, d], v, scale) -> [b, q_len, h, d]
      transformers' `flex_attention_forward` (compiled flex_attention) over that mask.
  dooly::hf_paged_kv_write(k [1, kv_h, n, d], v, write_index [n])
      `PagedAttentionCache.update` of a step that reads no cache (fresh prefills only).
  dooly::hf_paged_kv_update(k [1, kv_h, n, d], v, write_index [n], read_index [n + past])
      -> (k, v) [1, kv_h, n + past, d]: `PagedAttentionCache.update` writing n tokens and reading
      back every token of the step's requests.

The flex ops run for real: dooly times them from their signature. Flex attention only runs fused
when compiled; Dynamo compiles per new shape (first call of a shape, excluded from timing by the
warm-up), with its recompile limit lifted for that call so that no shape falls back to the
unfused path. The paged ops need transformers' cache: they are timed through
`dooly.engines.hf.paged`, which calls `PagedAttentionCache.update` itself.
"""

from __future__ import annotations

import contextlib

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from dooly.errors import DoolyError

_COMPILED: set = set()  # shapes flex attention / its mask were compiled for in this process
_MASKS: dict = {}  # (batch, q_len, kv_len) -> BlockMask: one mask per forward, shared by every layer
_EVAL = torch.nn.Module().eval()  # flex_attention_forward reads only `module.training`


def _compiling(key) -> contextlib.AbstractContextManager:
    """Lift Dynamo's recompile limit for the first call of a shape (later calls hit the cache)."""
    if key in _COMPILED:
        return contextlib.nullcontext()
    _COMPILED.add(key)
    return torch._dynamo.config.patch(recompile_limit=1 << 16, accumulated_recompile_limit=1 << 16)


def _causal_block_mask(batch: int, q_len: int, kv_len: int):
    from transformers.masking_utils import causal_mask_function, flex_attention_mask

    return flex_attention_mask(batch_size=batch, q_length=q_len, kv_length=kv_len, q_offset=kv_len - q_len,
                               kv_offset=0, mask_function=causal_mask_function)


@torch.library.custom_op("dooly::hf_flex_block_mask", mutates_args=())
def hf_flex_block_mask(batch: int, q_len: int, kv_len: int) -> None:
    with _compiling(("mask", batch, q_len, kv_len)):
        _causal_block_mask(batch, q_len, kv_len)


@hf_flex_block_mask.register_fake
def _(batch, q_len, kv_len):
    return None


@torch.library.custom_op("dooly::hf_flex_attention", mutates_args=())
def hf_flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    from transformers.integrations.flex_attention import flex_attention_forward

    shape = (query.shape[0], query.shape[2], key.shape[2])
    with _compiling(("attention", tuple(query.shape), tuple(key.shape), query.dtype, scale)):
        if shape not in _MASKS:
            _MASKS[shape] = _causal_block_mask(*shape)  # timed on its own, as dooly::hf_flex_block_mask
        out, _ = flex_attention_forward(_EVAL, query, key, value, _MASKS[shape], scaling=scale)
    return out


@hf_flex_attention.register_fake
def _(query, key, value, scale):
    b, h, q, d = query.shape
    return query.new_empty(b, q, h, d)


_NEEDS_CACHE = "runs against transformers' PagedAttentionCache: dooly times it through dooly.engines.hf.paged"


@torch.library.custom_op("dooly::hf_paged_kv_write", mutates_args=())
def hf_paged_kv_write(key: torch.Tensor, value: torch.Tensor, write_index: torch.Tensor) -> None:
    raise NotImplementedError(f"dooly::hf_paged_kv_write {_NEEDS_CACHE}")


@hf_paged_kv_write.register_fake
def _(key, value, write_index):
    return None


@torch.library.custom_op("dooly::hf_paged_kv_update", mutates_args=())
def hf_paged_kv_update(key: torch.Tensor, value: torch.Tensor, write_index: torch.Tensor,
                       read_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    raise NotImplementedError(f"dooly::hf_paged_kv_update {_NEEDS_CACHE}")


@hf_paged_kv_update.register_fake
def _(key, value, write_index, read_index):
    b, h, _, d = key.shape
    n = read_index.shape[0]
    return key.new_empty(b, h, n, d), value.new_empty(b, h, n, d)


# -- routing transformers' functions through the leaf ops (tracing only) --------------------------

class _CausalBlockMask:
    """What the model passes on to attention in place of the BlockMask (its shape is in the op)."""


CAUSAL = _CausalBlockMask()


def _flex_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
               attention_mask=None, **_):
    from transformers.masking_utils import causal_mask_function

    if mask_function is not causal_mask_function or attention_mask is not None:
        raise DoolyError("flex_attention is traced for plain causal masks only; this model builds another mask "
                         "(sliding window, chunked, padding or custom)")
    if not (statically_known_true(kv_offset == 0) and statically_known_true(q_offset == kv_length - q_length)):
        raise DoolyError("flex_attention is traced for queries that end at the last cached key only")
    torch.ops.dooly.hf_flex_block_mask(batch_size, q_length, kv_length)
    return CAUSAL


def _flex_attention(module, query, key, value, attention_mask, scaling=None, softcap=None, s_aux=None,
                    position_bias=None, **kwargs):
    if attention_mask is not CAUSAL:
        raise DoolyError("flex_attention got a mask dooly did not build; only causal masks are traced")
    if softcap is not None or s_aux is not None or position_bias is not None or kwargs.get("dropout", 0.0):
        raise DoolyError("flex_attention is traced without softcap, attention sinks, position bias or dropout")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return torch.ops.dooly.hf_flex_attention(query, key, value, scale), None


@contextlib.contextmanager
def _local_override(interface, key: str, fn):
    """transformers' interfaces take instance-local overrides: set one, restore what was there."""
    had = key in interface._local_mapping
    before = interface._local_mapping.get(key)
    interface[key] = fn
    try:
        yield
    finally:
        if had:
            interface[key] = before
        else:
            del interface[key]


@contextlib.contextmanager
def flex_leaves():
    """Within the block, transformers' flex mask and flex attention run as the two leaf ops."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    with _local_override(ALL_MASK_ATTENTION_FUNCTIONS, "flex_attention", _flex_mask), \
            _local_override(ALL_ATTENTION_FUNCTIONS, "flex_attention", _flex_attention):
        yield


def _paged_update(cache, key_states, value_states, layer_idx, kwargs):
    """`PagedAttentionCache.update` as a leaf op: same inputs, same outputs, no cache tensors touched."""
    if kwargs.get("block_table") is not None:
        raise DoolyError("the paged decode fast path (block table, flash kernels) is not traced")
    group = cache.layer_to_allocator[layer_idx].index
    write, read = kwargs["write_index"][group], kwargs["read_index"][group]
    if statically_known_true(read.numel() == 0):  # no cached tokens to read: transformers writes only
        torch.ops.dooly.hf_paged_kv_write(key_states, value_states, write)
        return key_states, value_states
    return torch.ops.dooly.hf_paged_kv_update(key_states, value_states, write, read)


@contextlib.contextmanager
def paged_leaves():
    """Within the block, `PagedAttentionCache.update` runs as the paged KV write / update leaf op."""
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    original = PagedAttentionCache.__dict__["update"]
    PagedAttentionCache.update = _paged_update
    try:
        yield
    finally:
        PagedAttentionCache.update = original
