"""Calibration: the real engine's per-step overhead in this environment, measured and stored
(`dooly calibrate`); `dooly.predict.overhead` says what it models and how it is predicted.

Each model (different depths: different numbers of dispatched ops) is profiled where the database
lacks it, then served by the real in-process engine on a mixed workload; every step's residual
(measured step time - predicted sum of its ops) becomes an overhead sample.
"""

from __future__ import annotations

import time

import pandas as pd

from dooly.deployment import Deployment
from dooly.engine_interface import get_engine
from dooly.errors import DoolyError
from dooly.records import IN_PROCESS_OPTIONS

CALIBRATION_MODELS = ("dooly/tiny-llama", "dooly/tiny-llama-deep")
# served as requests arrive (prefill, mixed and decode steps of many sizes), after a warm-up
CALIBRATION_WORKLOAD = "n=48,prompt=uniform:8:600,output=uniform:4:64,arrivals=poisson:12"


def calibrated(db: str | None = None, dtype: str = "bfloat16", tensor_parallel_size: int = 1,
               threads: int | None = None) -> bool:
    """Whether the database holds the engine's per-step overhead for this environment (`calibrate`)."""
    from dooly.db import LatencyDB
    from dooly.predict.overhead import OVERHEAD_SIG
    from dooly.predict.predictor import Predictor

    env = Deployment.resolve(CALIBRATION_MODELS[0], dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                             options=IN_PROCESS_OPTIONS, threads=threads).env
    try:
        return Predictor(LatencyDB(db, create=False), env).model(OVERHEAD_SIG) is not None
    except DoolyError:
        return False


def calibrate(db: str | None = None, models=CALIBRATION_MODELS, dtype: str = "bfloat16",
              threads: int | None = None, seed: int = 0, tensor_parallel_size: int = 1) -> pd.DataFrame:
    """Measure the real engine's per-step overhead in this environment and store it in the database.

    With `tensor_parallel_size` K > 1 the engine runs K workers and the overhead (scheduling,
    broadcasting the step to the workers, ...) is stored under that TP environment. Returns one row
    per served step: model, batch point, measured, predicted ops and overhead (microseconds).
    """
    from dooly.db import LatencyDB
    from dooly.predict.overhead import overhead_point, store_calibration
    from dooly.predict.predictor import Predictor
    from dooly.predict.step import StepPredictor
    from dooly.profile import Limits, plan_profile, run_profile
    from dooly.trace import trace_model
    from dooly.workload import ENGINE_WARMUP, parse_workload

    if not models:
        raise DoolyError("calibration needs at least one model")
    start = time.perf_counter()
    deployments = [Deployment.resolve(m, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                                      options=IN_PROCESS_OPTIONS, threads=threads) for m in models]
    env = deployments[0].env
    database = LatencyDB(db)
    traces = [
        trace_model(d.spec, engine=d.engine, dtype=d.dtype, tensor_parallel_size=d.tensor_parallel_size, cache=True)
        for d in deployments
    ]
    run_profile(plan_profile(traces, env, database.points(env.key), "reduced", Limits()), database)
    workload = parse_workload(f"{CALIBRATION_WORKLOAD},seed={seed}")
    warmup = parse_workload(f"{ENGINE_WARMUP},seed={seed + 1}")
    rows, residuals = [], []
    for d, trace in zip(deployments, traces):
        engine, vocab = get_engine(d.engine), d.spec.config["vocab_size"]
        with engine.running_engine(d.spec.config, dtype=d.dtype, kv_cache_gib=d.options.kv_cache_gib,
                                   tensor_parallel_size=d.tensor_parallel_size, threads=d.threads,
                                   **d.engine_kwargs()) as llm:
            engine.serve(llm, warmup, vocab)
            steps = []
            for _ in range(2):
                llm.reset_prefix_cache()
                steps += engine.serve(llm, workload, vocab)[1]
        step_ops = StepPredictor(trace, Predictor(database, env), overhead=False)
        for s in steps:
            measured_us, ops_us = (s.end_s - s.start_s) * 1e6, step_ops(s.batch).us
            point = overhead_point(trace, s.batch)
            residuals.append((point, measured_us - ops_us))
            rows.append({"model": d.model, **point, "measured_us": measured_us, "ops_us": ops_us,
                         "overhead_us": measured_us - ops_us})
    store_calibration(database, env, residuals, time.perf_counter() - start)
    return pd.DataFrame(rows)
