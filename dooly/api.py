"""The Python API: a few calls that run the pipeline's stages and return pandas DataFrames."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from dooly.errors import DoolyError


@dataclass
class SimulationResult:
    summary: pd.DataFrame  # one row per metric: mean, p50, p90, p99 (seconds), throughput rows
    requests: pd.DataFrame  # one row per request: ttft, tpot, e2e, ...
    steps: pd.DataFrame  # one row per engine step: batch composition and predicted latency


def parse_workload(spec, max_len: int | None = None):
    """A file path, or a synthetic spec "n=200,prompt=uniform:50:1000,output=128,arrivals=poisson:2,seed=0"."""
    from pathlib import Path

    from dooly.sim.workload import load, synthetic

    if isinstance(spec, list):
        return spec
    if Path(spec).exists() or spec.endswith((".csv", ".json")):
        return load(spec, max_len)
    fields = {}
    for part in spec.split(","):
        key, eq, value = part.partition("=")
        if not eq or key not in ("n", "prompt", "output", "arrivals", "seed"):
            raise DoolyError(f"bad workload {spec!r}: a file, or n=N,prompt=...,output=...,arrivals=...,seed=S")
        fields[key] = value
    try:
        n, seed = int(fields.pop("n", "100")), int(fields.pop("seed", "0"))
    except ValueError:
        raise DoolyError(f"bad workload {spec!r}: n and seed are integers") from None
    reqs = synthetic(n, seed=seed, **fields)
    if max_len is not None:
        too_long = next((r for r in reqs if r.prompt_tokens + r.output_tokens > max_len), None)
        if too_long is not None:
            raise DoolyError(f"workload request {too_long.request_id}: {too_long.prompt_tokens} + "
                             f"{too_long.output_tokens} tokens exceed the model's max length {max_len}")
    return reqs


def model_context(model: str, db: str | None, dtype: str, tp: int, threads: int | None, **limits: int):
    """What simulating `model` on vLLM at TP `tp` needs: (spec, cached trace, predictor on this environment);
    engine limits that are not positive fail first."""
    from dooly.catalog import resolve
    from dooly.db import LatencyDB
    from dooly.engines.vllm import version
    from dooly.predict import Predictor
    from dooly.profile import current_environment, default_threads
    from dooly.profile.runner import refuse_unprofilable
    from dooly.trace import trace_model

    for name, value in limits.items():
        if value <= 0:
            raise DoolyError(f"{name} must be > 0, got {value}")
    spec = resolve(model)
    trace = trace_model(spec, dtype=dtype, tp=tp, cache=True)
    refuse_unprofilable(trace, "predict")
    env = current_environment("vllm", version(), dtype, threads or default_threads(tp), tp=tp)
    return spec, trace, Predictor(LatencyDB(db, create=False), env)


def simulate(model: str, workload, *, db: str | None = None, dtype: str = "bfloat16",
             max_num_batched_tokens: int = 4096, max_num_seqs: int = 256, enable_prefix_caching: bool = True,
             enable_chunked_prefill: bool = True, num_gpu_blocks: int | None = None,
             threads: int | None = None, scheduler: str = "fast",
             tensor_parallel_size: int = 1) -> SimulationResult:
    """Simulate serving `model` on vLLM (this machine's engine) for `workload`, from the database.

    scheduler: "fast" (dooly's re-implementation of vLLM's policy, tested to make the same batches)
    or "vllm" (vLLM's own scheduler and KV-cache manager driven in virtual time; slower)."""
    from dooly.engines.vllm.scheduler import VllmScheduler
    from dooly.predict import StepPredictor
    from dooly.sim import simulate as run
    from dooly.sim.metrics import requests_frame, steps_frame, summary
    from dooly.sim.scheduler import FastScheduler

    spec, trace, predictor = model_context(model, db, dtype, tensor_parallel_size, threads,
                                           max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs)
    tp = tensor_parallel_size
    if num_gpu_blocks is None and tp > 1:
        from dooly.sim.scheduler import kv_blocks, scheduler_settings

        num_gpu_blocks = kv_blocks(scheduler_settings(spec.config, dtype, max_num_batched_tokens=max_num_batched_tokens,
                                                      max_num_seqs=max_num_seqs), tp)
    schedulers = {"fast": FastScheduler, "vllm": VllmScheduler}
    if scheduler not in schedulers:
        raise DoolyError(f"scheduler must be one of {sorted(schedulers)}, got {scheduler!r}")
    sched = schedulers[scheduler](spec.config, dtype, num_blocks=num_gpu_blocks,
                                  max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                  enable_prefix_caching=enable_prefix_caching,
                                  enable_chunked_prefill=enable_chunked_prefill)
    requests = parse_workload(workload, sched.max_model_len)
    step = StepPredictor(trace, predictor)
    results, steps = run(requests, sched, lambda batch: step(batch).us / 1e6,
                         vocab=spec.config["vocab_size"])
    return SimulationResult(summary(results), requests_frame(results), steps_frame(steps))


CALIBRATION_MODELS = ("dooly/tiny-llama", "dooly/tiny-llama-deep")


def calibrated(db: str | None = None, dtype: str = "bfloat16", tensor_parallel_size: int = 1) -> bool:
    """Whether the database holds the engine's per-step overhead for this environment (`calibrate`)."""
    from dooly.db import LatencyDB
    from dooly.engines.vllm import version
    from dooly.predict import Predictor
    from dooly.predict.overhead import OVERHEAD_SIG
    from dooly.profile import current_environment, default_threads

    tp = tensor_parallel_size
    env = current_environment("vllm", version(), dtype, default_threads(tp), tp=tp)
    try:
        return Predictor(LatencyDB(db, create=False), env).model(OVERHEAD_SIG) is not None
    except DoolyError:
        return False


def calibrate(db: str | None = None, models=CALIBRATION_MODELS, dtype: str = "bfloat16",
              threads: int | None = None, seed: int = 0, tensor_parallel_size: int = 1) -> pd.DataFrame:
    """Measure the real engine's per-step overhead in this environment and store it in the database.

    With `tensor_parallel_size` K > 1 the engine runs K workers and the overhead (scheduling,
    broadcasting the step to the workers, ...) is stored under that TP environment.

    Each model (different depths: different numbers of dispatched ops) is profiled where the database
    lacks it, then served by the real in-process engine on a mixed workload; every step's residual
    (measured step time - predicted sum of its ops) becomes an overhead sample. Returns the samples.
    """
    import time

    from dooly.catalog import resolve
    from dooly.db import LatencyDB
    from dooly.engines.vllm import version
    from dooly.engines.vllm.engine import running_engine, serve
    from dooly.predict import Predictor, StepPredictor
    from dooly.predict.overhead import overhead_point, store_calibration
    from dooly.profile import Limits, current_environment, default_threads, plan_profile, run_profile
    from dooly.sim.workload import synthetic
    from dooly.trace import trace_model

    start = time.perf_counter()
    database = LatencyDB(db)
    tp = tensor_parallel_size
    env = current_environment("vllm", version(), dtype, threads or default_threads(tp), tp=tp)
    specs = [resolve(m) for m in models]
    traces = [trace_model(s, dtype=dtype, tp=tp, cache=True) for s in specs]
    plan = plan_profile(traces, env, database.points(env.key), "reduced", Limits())
    run_profile(plan, database)
    # served as requests arrive (prefill, mixed and decode steps of many sizes), after a warm-up
    workload = synthetic(48, prompt="uniform:8:600", output="uniform:4:64", arrivals="poisson:12", seed=seed)
    warmup = synthetic(8, prompt="uniform:16:300", output="uniform:4:24", arrivals="burst", seed=seed + 1)
    rows, residuals = [], []
    for spec, trace in zip(specs, traces):
        vocab = spec.config["vocab_size"]
        with running_engine(spec.config, dtype=dtype, tensor_parallel_size=tp, threads=threads) as llm:
            serve(llm, warmup, vocab)
            steps = []
            for _ in range(2):
                llm.reset_prefix_cache()
                steps += serve(llm, workload, vocab)[1]
        step_ops = StepPredictor(trace, Predictor(database, env), overhead=False)
        for s in steps:
            seconds = s.end_s - s.start_s
            ops = step_ops(s.batch).us
            point = overhead_point(trace, s.batch)
            residuals.append((point, seconds * 1e6 - ops))
            rows.append({"model": spec.name, **point, "measured_us": seconds * 1e6, "ops_us": ops,
                         "overhead_us": seconds * 1e6 - ops})
    store_calibration(database, env.key, residuals, time.perf_counter() - start)
    return pd.DataFrame(rows)


def search(models, workload, slo, grid=None, **kwargs):
    """Goodput of every model x engine-option configuration under an SLO (`dooly.search.search`).

    Returns a `SearchResult`: `.configs` (one row per configuration, best first) and `.rates` (one row
    per simulated rate), pandas DataFrames."""
    from dooly.search import search as run

    return run(models, workload, slo, grid, **kwargs)


def capacity(model: str, rate: float, workload, slo, grid=None, **kwargs):
    """(plan, search): replicas and devices serving `rate` requests/s with the configuration of most
    goodput per device (`dooly.search.capacity`); raises `dooly.search.NoConfiguration` if none meets the SLO."""
    from dooly.search import capacity as run

    return run(model, rate, workload, slo, grid, **kwargs)
