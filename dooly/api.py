"""The Python API: a few calls that run the pipeline's stages and return pandas DataFrames."""

from __future__ import annotations

import pandas as pd

from dooly.engine_interface import get_engine
from dooly.errors import DoolyError
from dooly.sim.run import SimulationResult, model_context, simulate
from dooly.sim.workload import parse_workload

__all__ = ["SimulationResult", "calibrate", "calibrated", "capacity", "model_context", "parse_workload", "search",
           "simulate"]


CALIBRATION_MODELS = ("dooly/tiny-llama", "dooly/tiny-llama-deep")


def calibrated(db: str | None = None, dtype: str = "bfloat16", tensor_parallel_size: int = 1) -> bool:
    """Whether the database holds the engine's per-step overhead for this environment (`calibrate`)."""
    from dooly.db import LatencyDB
    from dooly.predict import Predictor
    from dooly.predict.overhead import OVERHEAD_SIG
    from dooly.profile import current_environment, default_threads

    vllm = get_engine("vllm")
    tp = tensor_parallel_size
    env = current_environment("vllm", vllm.version(), dtype, default_threads(tp), tp=tp)
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
    from dooly.predict import Predictor, StepPredictor
    from dooly.predict.overhead import overhead_point, store_calibration
    from dooly.profile import Limits, current_environment, default_threads, plan_profile, run_profile
    from dooly.sim.workload import synthetic
    from dooly.trace import trace_model

    vllm = get_engine("vllm")
    start = time.perf_counter()
    database = LatencyDB(db)
    tp = tensor_parallel_size
    env = current_environment("vllm", vllm.version(), dtype, threads or default_threads(tp), tp=tp)
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
        with vllm.running_engine(spec.config, dtype=dtype, tensor_parallel_size=tp, threads=threads) as llm:
            vllm.serve(llm, warmup, vocab)
            steps = []
            for _ in range(2):
                llm.reset_prefix_cache()
                steps += vllm.serve(llm, workload, vocab)[1]
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
