"""HF transformers model code as a second engine: `generate()` (static batch: prefill, then decode with
a KV cache) and `generate_batch()` (continuous batching on a paged KV cache)."""

from dooly.engines.hf import paged as stateful
from dooly.engines.hf.tracer import NAME, attention_backends, dispatch_key, request_vars, run_trace, version

__all__ = ["NAME", "attention_backends", "dispatch_key", "request_vars", "run_trace", "stateful", "version"]
