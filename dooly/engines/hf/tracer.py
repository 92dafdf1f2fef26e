"""Trace HF transformers' model code on fake weights, as `generate()` / `generate_batch()` run it.

Recorded under `torch.no_grad()`, the mode both run in (aten then shows what actually executes,
e.g. `mm` and `_scaled_dot_product_flash_attention_for_cpu`, not `linear`).

Attention backends and what is traced:
  sdpa, eager, flex_attention   `generate()` with a DynamicCache: a prefill step and a decode step
      over a padded batch. Request variables: batch_size (sequences), seq_len (new tokens per
      sequence), past_len (tokens already in each sequence's KV cache). flex_attention's block mask
      and attention run as leaf ops (`dooly.engines.hf.ops`): fake tensors cannot build a BlockMask.
  paged|sdpa, paged|eager       continuous batching (`generate_batch()`): the model forward of one
      step on transformers' PagedAttentionCache, with the kwargs its ContinuousBatchingIOs pass
      (PagedAttentionArgs: flattened tokens, a [1, 1, tokens, keys] mask, read/write indices).
      transformers 5.19 names these `sdpa` (with a paged cache) and `paged|eager`. Two steps: a
      "prefill" step that reads no cache (fresh prompts only) and a "step" that reads it (decodes
      and prompt chunks after cached tokens). Request variables: num_tokens (tokens of the step,
      all requests flattened), num_reqs (requests in the step), past_len (cached tokens read, summed
      over the step's requests: every query attends over num_tokens + past_len keys under the mask).
      The cache update runs as a leaf op, timed through transformers' own cache (`paged.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from dooly.engine_interface import RunResult
from dooly.engines.hf import ATTN_IMPLEMENTATIONS
from dooly.errors import DoolyError
from dooly.trace.recorder import record_ops

PAGED_TRACE_BLOCKS = 4  # pages of the (fake) cache the traced step runs on: its size is never read
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_config(config: dict):
    from transformers import AutoConfig

    kw = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "torch_dtype",
                                                       "transformers_version")}
    try:
        return AutoConfig.for_model(config["model_type"], **kw)
    except (ValueError, KeyError, TypeError) as e:
        raise DoolyError(f"transformers rejected the config: {str(e).splitlines()[0]}") from None


def run_trace(
    config: dict,
    tensor_parallel_size: int = 1,
    dtype: str = "bfloat16",
    attention_backend: str | None = None,
    hints: tuple[int, int] = (37, 3),
) -> RunResult:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    backend = attention_backend or "sdpa"
    if tensor_parallel_size != 1:
        raise DoolyError("the hf engine runs without tensor parallelism: use --tp 1 or --engine vllm")
    if backend not in ATTN_IMPLEMENTATIONS:
        raise DoolyError(f"unknown attention implementation {backend!r}; "
                         f"available: {', '.join(ATTN_IMPLEMENTATIONS)}")
    cfg = build_config(config)
    shape_env = ShapeEnv(specialize_zero_one=False)
    fm = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)
    try:
        with fm, no_init_weights():
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation=ATTN_IMPLEMENTATIONS[backend],
                                                     dtype=_DTYPES[dtype])
    except (ValueError, KeyError) as e:
        raise DoolyError(f"transformers cannot build {config.get('model_type')}: {str(e).splitlines()[0]}") from None
    model.eval()
    if backend.startswith("paged|"):
        ops, symbols = _trace_paged(model, fm, _DTYPES[dtype], hints)
    else:
        ops, symbols = _trace_generate(model, fm, hints, flex=backend == "flex_attention")
    guards = [str(g.expr) for g in shape_env.guards]
    specialized = [name for sym, name in symbols.items() if sym in shape_env.replacements]
    return RunResult(ops=ops, symbols=symbols, guards=guards, specialized=specialized)


def _sizes(fm, *hints: int) -> tuple:
    """One symbolic size per hint (the example values only steer the fake run, never the labels)."""
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

    ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * len(hints))
    return tuple(fm.from_tensor(torch.zeros(hints, dtype=torch.int8), symbolic_context=ctx).shape)


def _trace_generate(model, fm, hints: tuple[int, int], flex: bool):
    """Prefill then decode with a DynamicCache, as `generate()` runs them."""
    from dooly.engines.hf.ops import flex_leaves

    n_tok, batch = hints
    batch_size, seq_len, past_len = _sizes(fm, batch, n_tok, n_tok + 5)
    symbols = {batch_size.node.expr: "batch_size", seq_len.node.expr: "seq_len", past_len.node.expr: "past_len"}
    with torch.no_grad(), fm, (flex_leaves() if flex else contextlib.nullcontext()):
        prefill_ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
        with record_ops(model, phase="prefill") as pre:
            model(input_ids=prefill_ids, use_cache=True)
        past_ids = torch.zeros(batch_size, past_len, dtype=torch.long)
        cache = model(input_ids=past_ids, use_cache=True).past_key_values  # fills the KV cache, unrecorded
        decode_ids = prefill_ids[:, :1]
        with record_ops(model, phase="decode") as dec:
            model(input_ids=decode_ids, past_key_values=cache, use_cache=True)
    return pre.ops + dec.ops, symbols


def _trace_paged(model, fm, dtype: torch.dtype, hints: tuple[int, int]):
    """Two continuous-batching steps on transformers' PagedAttentionCache (fake storage)."""
    from dooly.engines.hf.ops import paged_leaves
    from dooly.engines.hf.paged import STATEFUL_OPS, paged_cache

    n_tok, n_req = hints
    num_tokens, num_reqs, past_len = _sizes(fm, n_tok, n_req, n_tok + 5)
    symbols = {num_tokens.node.expr: "num_tokens", num_reqs.node.expr: "num_reqs", past_len.node.expr: "past_len"}
    with fm:
        cache, _ = paged_cache(model.config, dtype, PAGED_TRACE_BLOCKS, n_tok)
    if list(cache.cache_allocators) != ["full_attention"]:
        raise DoolyError("the paged path is traced for models whose layers all use full attention; "
                         f"this one has {', '.join(cache.cache_allocators)} layers")
    with torch.no_grad(), fm, paged_leaves():
        fresh = _step_kwargs(model, cache, num_tokens, num_reqs, None, dtype)
        with record_ops(model, phase="prefill") as pre:
            model(**fresh)
        cached = _step_kwargs(model, cache, num_tokens, num_reqs, past_len, dtype)
        with record_ops(model, phase="step") as step:
            model(**cached)
    layer = cache.cache_allocators["full_attention"]
    attrs = (("backend", "paged"), ("head_size", layer.head_dim), ("num_kv_heads", layer.num_key_value_heads),
             ("page_size", layer.tokens_per_page))  # kernel identity: the profiler rebuilds this cache
    ops = [dataclasses.replace(o, attrs=attrs) if o.op in STATEFUL_OPS else o for o in pre.ops + step.ops]
    return ops, symbols


def _step_kwargs(model, cache, num_tokens, num_reqs, past_len, dtype: torch.dtype) -> dict:
    """The forward kwargs ContinuousBatchingIOs.get_model_kwargs passes for a step (PagedAttentionArgs).

    past_len None: a step that reads no cache (fresh prompts only; its read indices are empty).
    """
    from transformers.generation.continuous_batching.input_outputs import PagedAttentionArgs

    def i32(*shape):
        return torch.zeros(*shape, dtype=torch.int32)

    groups = list(cache.cache_allocators)
    kv_len = num_tokens if past_len is None else num_tokens + past_len
    kwargs = PagedAttentionArgs(
        input_ids=i32(1, num_tokens), position_ids=i32(1, num_tokens),
        cu_seq_lens_q=i32(num_reqs + 1), max_length_q=num_tokens,
        logits_indices=i32(num_reqs), logits_processor_args=i32(0, num_reqs),
        cu_seq_lens_k={g: i32(num_reqs + 1) for g in groups}, max_length_k={g: kv_len for g in groups},
        attention_mask=torch.zeros(1, 1, num_tokens, kv_len, dtype=dtype),
        read_index=[torch.zeros(0 if past_len is None else kv_len, dtype=torch.int64) for _ in groups],
        write_index=[torch.zeros(num_tokens, dtype=torch.int64) for _ in groups],
        cache=cache, block_table=None, use_cache=False, is_causal=False)
    if model._supports_logits_to_keep():  # what ModelRunner.compute_batch does
        kwargs["logits_to_keep"] = kwargs["logits_indices"]
    return kwargs
