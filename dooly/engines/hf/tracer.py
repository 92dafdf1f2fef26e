"""Trace HF transformers' model code on fake weights: a prefill step and a decode step.

Recorded under `torch.no_grad()`, the mode `generate()` runs in (aten then shows what actually
executes, e.g. `mm` and `_scaled_dot_product_flash_attention_for_cpu`, not `linear`).
Request variables: batch_size, seq_len (new tokens per sequence), past_len (tokens in the KV cache).
"""

from __future__ import annotations

import os

import torch

from dooly.engines import RunResult
from dooly.errors import DoolyError
from dooly.trace.recorder import record_ops

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

NAME = "hf"
request_vars = ("batch_size", "seq_len", "past_len")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def version() -> str:
    import transformers

    return f"transformers=={transformers.__version__}"


def build_config(config: dict):
    from transformers import AutoConfig

    kw = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "torch_dtype",
                                                       "transformers_version")}
    try:
        return AutoConfig.for_model(config["model_type"], **kw)
    except (ValueError, KeyError, TypeError) as e:
        raise DoolyError(f"transformers rejected the config: {str(e).splitlines()[0]}") from None


def attention_backends() -> list[str]:
    return list(ATTN_IMPLEMENTATIONS)


def run_trace(config: dict, tp: int = 1, dtype: str = "bfloat16", attention_backend: str | None = None,
              hints: tuple[int, int] = (37, 3)) -> RunResult:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    attn_implementation = attention_backend or "sdpa"
    if tp != 1:
        raise DoolyError("the hf engine runs without tensor parallelism: use --tp 1 or --engine vllm")
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise DoolyError(f"unknown attention implementation {attn_implementation!r}; "
                         f"available: {', '.join(ATTN_IMPLEMENTATIONS)}")
    cfg = build_config(config)
    shape_env = ShapeEnv(specialize_zero_one=False)
    fm = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)
    try:
        with fm, no_init_weights():
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation,
                                                     dtype=_DTYPES[dtype])
    except (ValueError, KeyError) as e:
        raise DoolyError(f"transformers cannot build {config.get('model_type')}: {str(e).splitlines()[0]}") from None
    model.eval()
    n_tok, batch = hints
    dyn2 = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.DYNAMIC])
    dyn1 = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
    prefill_ids = fm.from_tensor(torch.zeros(batch, n_tok, dtype=torch.long), symbolic_context=dyn2)
    past_ids = fm.from_tensor(torch.zeros(batch, n_tok + 5, dtype=torch.long), symbolic_context=dyn2)
    symbols = {prefill_ids.shape[0].node.expr: "batch_size", prefill_ids.shape[1].node.expr: "seq_len",
               past_ids.shape[1].node.expr: "past_len"}
    with torch.no_grad(), fm:
        # the decode step's batch must be the same symbol as the prefill's
        past_ids = past_ids[: prefill_ids.shape[0]]
        with record_ops(model, phase="prefill") as pre:
            model(input_ids=prefill_ids, use_cache=True)
        cache = model(input_ids=past_ids, use_cache=True).past_key_values  # fills the KV cache, unrecorded
        decode_ids = prefill_ids[:, :1]
        with record_ops(model, phase="decode") as dec:
            model(input_ids=decode_ids, past_key_values=cache, use_cache=True)
    guards = [str(g.expr) for g in shape_env.guards]
    specialized = [name for sym, name in symbols.items() if sym in shape_env.replacements]
    return RunResult(ops=pre.ops + dec.ops, symbols=symbols, guards=guards, specialized=specialized)
