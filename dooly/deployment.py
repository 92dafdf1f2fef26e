"""One deployment, resolved once: a model served by an engine at a dtype, a tensor-parallel size and
engine options, with what the engine actually makes of them.

`dooly.records.EngineOptions` carries the engine options dooly models and their defaults (the CLI's,
the API's, the profiler's limits and the Vidur export's all come from there). `Deployment.resolve` turns
(model, dtype, tensor_parallel_size, options) into the effective scheduler settings (vLLM may lower
an option; its values are the ones that count), the KV-cache blocks of each rank, the threads of
each rank and the `Environment` whose measurements predict it. simulate, validate, search,
capacity, export and calibrate consume a `Deployment` instead of resolving these again.

Resolving needs no engine import once the settings are cached (`scheduler_settings`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from dooly.catalog import ModelSpec, resolve
from dooly.db.records import Environment
from dooly.engine_interface import get_engine
from dooly.errors import DoolyError
from dooly.records import DEFAULT_OPTIONS, EngineOptions
from dooly.profile.environment import current_environment, default_threads

SETTINGS_FORMAT = 2


@dataclass(frozen=True)
class Deployment:
    """A model served by an engine, resolved once (`Deployment.resolve`)."""

    spec: ModelSpec  # the model
    engine: str  # "vllm"
    dtype: str
    tensor_parallel_size: int
    options: EngineOptions  # as asked
    settings: dict  # the scheduler settings the engine uses for them (`scheduler_settings`)
    num_blocks: int  # KV-cache blocks of each rank (each holds 1/tensor_parallel_size of the KV heads)
    threads: int  # compute threads of each rank
    env: Environment  # where measurements that predict this deployment were taken

    @classmethod
    def resolve(cls, model: str | ModelSpec, *, dtype: str = "bfloat16", tensor_parallel_size: int = 1,
                options: EngineOptions = DEFAULT_OPTIONS, threads: int | None = None,
                num_blocks: int | None = None, engine: str = "vllm") -> "Deployment":
        """`num_blocks`: the KV blocks a running engine reports, instead of those its KV space gives."""
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise DoolyError(f"tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}")
        if threads is not None and threads < 1:
            raise DoolyError(f"threads must be >= 1, got {threads}")
        if num_blocks is not None and num_blocks < 1:
            raise DoolyError(f"num_gpu_blocks must be >= 1, got {num_blocks}")
        spec = model if isinstance(model, ModelSpec) else resolve(model)
        if options.kv_cache_dtype != "auto":
            from dooly.trace.core import check_kv_cache_dtype

            check_kv_cache_dtype(get_engine(engine), options.kv_cache_dtype, options.attention_backend)
        if options.quantization is not None:
            from dooly.trace.core import check_quantization_method

            check_quantization_method(get_engine(engine), options.quantization)
        settings = scheduler_settings(spec.config, dtype, engine, **options.engine_kwargs(tensor_parallel_size))
        threads = threads or default_threads(tensor_parallel_size)
        env = current_environment(engine, get_engine(engine).version(), dtype, threads, tensor_parallel_size)
        return cls(spec, engine, dtype, tensor_parallel_size, options, settings,
                   num_blocks or kv_blocks(settings, options.kv_cache_gib, tensor_parallel_size), threads, env)

    @property
    def model(self) -> str:
        return self.spec.name

    @property
    def max_num_seqs(self) -> int:
        """Requests per step, as the engine uses it (vLLM may lower the option)."""
        return self.settings["max_num_seqs"]

    @property
    def max_num_batched_tokens(self) -> int:
        return self.settings["max_num_batched_tokens"]

    @property
    def max_model_len(self) -> int:
        return self.settings["max_model_len"]

    @property
    def block_size(self) -> int:
        return self.settings["block_size"]

    def check_fits(self, requests) -> None:
        """Refuse a workload whose longest request cannot fit in the KV cache even alone (the engine
        could never finish it): each request holds the KV of its prompt and all but its last output token."""
        longest = max(requests, key=lambda r: r.prompt_tokens + r.output_tokens, default=None)
        if longest is None:
            return
        tokens = longest.prompt_tokens + longest.output_tokens - 1
        need = -(-tokens // self.block_size)
        if need > self.num_blocks - 1:  # block 0 is vLLM's null block, never handed out
            raise DoolyError(f"the KV cache has {self.num_blocks} blocks of {self.block_size} tokens (one of them "
                             f"vLLM's null block), but request {longest.request_id} ({longest.prompt_tokens} + "
                             f"{longest.output_tokens} tokens) needs {need} blocks alone: give more --num-gpu-blocks "
                             f"/ --kv-cache-gib, or shorter requests")

    def engine_kwargs(self) -> dict:
        """Options for starting the real engine (tensor-parallel size and KV space are passed apart)."""
        return self.options.engine_kwargs()


def kv_blocks(settings: dict, kv_cache_gib: float, tensor_parallel_size: int = 1) -> int:
    """KV-cache blocks the engine gets from `kv_cache_gib` GiB per worker: at tensor-parallel size K,
    each of the K workers holds 1/K of the KV heads of every block in its own space."""
    return int(kv_cache_gib * (1 << 30) * tensor_parallel_size // settings["kv_bytes_per_block"])


@functools.lru_cache(maxsize=None)
def settings_code(engine: str = "vllm") -> tuple[str, ...]:
    """What resolved settings depend on besides their inputs: the engine's version and the code that
    resolves them (part of every cache key over settings; read once per process)."""
    eng = get_engine(engine)
    return (eng.version(), *(f.read_text() for f in (Path(__file__), *eng.settings_sources())))


def scheduler_settings(config: dict, dtype: str = "bfloat16", engine: str = "vllm", **engine_kwargs) -> dict:
    """The scheduling settings the engine's config resolves for these options, cached as JSON under
    `$DOOLY_CACHE/schedulers`: building vLLM's config imports vLLM (seconds).

    The key hashes the model config, dtype, options, the engine's version and the code that resolves them.
    """
    from dooly.trace.cache import cache_dir, write_atomic

    text = json.dumps([SETTINGS_FORMAT, config, dtype, engine_kwargs, settings_code(engine)],
                      sort_keys=True, default=str)
    path = cache_dir().parent / "schedulers" / f"{hashlib.sha1(text.encode()).hexdigest()}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing or unreadable: resolve and (re)write
        pass
    settings = get_engine(engine).resolve_scheduler_settings(config, dtype, engine_kwargs)
    write_atomic(path, json.dumps(settings))
    return settings
