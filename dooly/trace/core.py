"""Tracing a model (`trace_model`): checks, the disk cache, then the differential runs
(`dooly.trace.differential`). Reading a cached trace imports neither sympy nor the engine.
"""

from __future__ import annotations

import dataclasses

from dooly.catalog import ModelSpec
from dooly.engine_interface import get_engine
from dooly.errors import DoolyError
from dooly.trace.params import config_params
from dooly.trace.records import Trace

DTYPES = ("bfloat16", "float16", "float32")


def check_tensor_parallel(spec: ModelSpec, tensor_parallel_size: int, what: str | None = None) -> None:
    """vLLM's rule: the degree divides the attention heads; it divides the KV heads too, or, when
    there are fewer KV heads than ranks, is a multiple of them (each KV head is then replicated).
    `what`: how the message names the degree (default `--tp K`)."""
    params = config_params(spec.config, tensor_parallel_size)
    heads, kv_heads = params["num_attention_heads"], params["num_key_value_heads"]
    what = what or f"--tp {tensor_parallel_size}"
    if heads % tensor_parallel_size:
        raise DoolyError(f"{what} does not divide num_attention_heads={heads} of {spec.name}")
    if kv_heads % tensor_parallel_size and tensor_parallel_size % kv_heads:
        raise DoolyError(f"{what} neither divides num_key_value_heads={kv_heads} of {spec.name} nor is a "
                         f"multiple of it (for vLLM to replicate the KV heads)")


def check_quantization(spec: ModelSpec, tensor_parallel_size: int) -> None:
    """A `quantization_config` whose weight group size does not divide a linear layer's input (as each
    rank holds it) names the layer's input in one line, before any engine runs."""
    qc = spec.config.get("quantization_config")
    if qc is None:
        return
    if not isinstance(qc, dict) or not isinstance(qc.get("quant_method"), str):
        raise DoolyError(f"{spec.name}: quantization_config must be a mapping with a quant_method")
    sizes = [qc.get("group_size")] + [(g.get("weights") or {}).get("group_size")
                                      for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict)]
    params = config_params(spec.config, tensor_parallel_size)
    inputs = {"hidden_size": params["hidden_size"],
              "head_dim*num_attention_heads/tp": params["head_dim"] * params["num_attention_heads"]
              // tensor_parallel_size}
    if "intermediate_size" in params:
        inputs["intermediate_size/tp"] = params["intermediate_size"] // tensor_parallel_size
    for g in sizes:
        if g is None or g == -1:  # per-channel
            continue
        if not isinstance(g, int) or isinstance(g, bool) or g <= 0:
            raise DoolyError(f"{spec.name}: quantization_config group_size must be a positive integer or -1, got {g!r}")
        for name, dim in inputs.items():
            if dim % g:
                raise DoolyError(f"{spec.name}: quantization_config group_size {g} does not divide the input of a "
                                 f"linear layer, {name} = {dim}" + (f" at tp {tensor_parallel_size}"
                                                                    if tensor_parallel_size > 1 else ""))


def trace_model(spec: ModelSpec, engine: str = "vllm", tensor_parallel_size: int = 1, dtype: str = "bfloat16",
                hints: tuple[int, int] | None = None, attention_backend: str | None = None,
                cache: bool = False, kv_cache_dtype: str | None = None, quantization: str | None = None) -> Trace:
    """Trace one step of `spec` on `engine` and label every dimension of every op by its origin.

    `kv_cache_dtype`: the KV-cache storage ("fp8", ...; None or "auto": the model's dtype), which
    changes the attention and KV-write kernels. `quantization`: the engine's weight-quantization method
    as its --quantization spells it (None: the checkpoint's own). `cache=True` reads and fills the disk cache
    (dooly.trace.cache) keyed on everything a trace depends on, for stages that only consume traces."""
    if dtype not in DTYPES:
        raise DoolyError(f"unknown dtype {dtype!r}; dtypes: {', '.join(DTYPES)}")
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise DoolyError(f"tensor-parallel degree must be a positive integer, got {tensor_parallel_size!r}")
    check_tensor_parallel(spec, tensor_parallel_size)
    check_quantization(spec, tensor_parallel_size)
    params = config_params(spec.config, tensor_parallel_size)
    eng = get_engine(engine)
    kwargs: dict = {"hints": hints} if hints else {}
    if attention_backend is not None:
        available = eng.attention_backends()
        if attention_backend not in available:
            raise DoolyError(f"attention backend {attention_backend!r} is not offered by {engine} here; "
                             f"available: {', '.join(available)}")
        kwargs["attention_backend"] = attention_backend
    if kv_cache_dtype == "auto":
        kv_cache_dtype = None
    if kv_cache_dtype is not None:
        check_kv_cache_dtype(eng, kv_cache_dtype, attention_backend)
        kwargs["kv_cache_dtype"] = kv_cache_dtype
    if quantization is not None:
        check_quantization_method(eng, quantization)
        kwargs["quantization"] = quantization
    if cache:
        from dooly.trace import cache as trace_cache

        key = trace_cache.cache_key(
            spec.config,
            engine,
            eng.version(),
            tensor_parallel_size,
            dtype,
            attention_backend,
            hints,
            eng.dispatch_key(),
            kv_cache_dtype,
            quantization,
        )
        hit = trace_cache.get(key)
        if hit is not None:
            return dataclasses.replace(hit, model=spec.name)
        trace = trace_model(spec, engine, tensor_parallel_size, dtype, hints, attention_backend,
                            kv_cache_dtype=kv_cache_dtype, quantization=quantization)
        trace_cache.put(key, trace)
        return trace
    from dooly.trace.differential import trace_runs

    trace = trace_runs(spec, engine, tensor_parallel_size, dtype, params, kwargs)
    trace.quantization = quantization
    return trace


def check_quantization_method(eng, quantization: str) -> None:
    """One line naming the engine's methods when `quantization` is not one of them."""
    offered = eng.quantization_methods()
    if quantization not in offered:
        raise DoolyError(f"unknown --quantization {quantization!r} for {eng.name}; "
                         + (f"methods: {', '.join(offered)}" if offered else "it takes no --quantization"))


def check_kv_cache_dtype(eng, kv_cache_dtype: str, attention_backend: str | None = None) -> None:
    """One line naming the offered KV-cache dtypes when `kv_cache_dtype` is not one of them."""
    offered = eng.kv_cache_dtypes(attention_backend)
    if kv_cache_dtype not in offered:
        backend = attention_backend or "its default attention backend"
        raise DoolyError(f"unknown --kv-cache-dtype {kv_cache_dtype!r} for {eng.name} with {backend}; "
                         f"offered: {', '.join(offered)}")
