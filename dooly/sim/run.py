"""Simulating a deployment end to end: the model's cached trace, the predictor on this environment, the
engine's scheduling policy in virtual time, and the metrics (the `dooly simulate` stage)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from dooly.engine_interface import get_engine
from dooly.errors import DoolyError
from dooly.sim.workload import parse_workload


@dataclass
class SimulationResult:
    summary: pd.DataFrame  # one row per metric: mean, p50, p90, p99 (seconds), throughput rows
    requests: pd.DataFrame  # one row per request: ttft, tpot, e2e, ...
    steps: pd.DataFrame  # one row per engine step: batch composition and predicted latency


def model_context(model: str, db: str | None, dtype: str, tp: int, threads: int | None, **limits: int):
    """What simulating `model` on vLLM at TP `tp` needs: (spec, cached trace, predictor on this environment);
    engine limits that are not positive fail first."""
    from dooly.catalog import resolve
    from dooly.db import LatencyDB
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
    env = current_environment("vllm", get_engine("vllm").version(), dtype, threads or default_threads(tp), tp=tp)
    return spec, trace, Predictor(LatencyDB(db, create=False), env)


def simulate(model: str, workload, *, db: str | None = None, dtype: str = "bfloat16",
             max_num_batched_tokens: int = 4096, max_num_seqs: int = 256, enable_prefix_caching: bool = True,
             enable_chunked_prefill: bool = True, num_gpu_blocks: int | None = None,
             threads: int | None = None, scheduler: str = "fast",
             tensor_parallel_size: int = 1) -> SimulationResult:
    """Simulate serving `model` on vLLM (this machine's engine) for `workload`, from the database.

    scheduler: "fast" (dooly's re-implementation of vLLM's policy, tested to make the same batches)
    or "vllm" (vLLM's own scheduler and KV-cache manager driven in virtual time; slower)."""
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
    schedulers = {"fast": FastScheduler, "vllm": get_engine("vllm").Scheduler}
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
