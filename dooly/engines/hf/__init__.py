"""HF transformers model code as a second engine (static batch: prefill, then decode with a KV cache)."""

from dooly.engines.hf.tracer import NAME, attention_backends, request_vars, run_trace, version

__all__ = ["NAME", "attention_backends", "request_vars", "run_trace", "version"]
