"""Calibration (`dooly calibrate`): how the real engine's steps differ from the sum of the ops measured
alone, in this environment, stored in the database like any other measurement.

Two things are measured on the real in-process engine, serving small models of different depths
(their ops must be in the database: calibration names the `dooly profile` command otherwise):
1. every op's time inside real steps (the engine's `time_ops`), per op family, against the database's
   prediction of the same ops at the same point -> the in-engine ratios (`dooly.predict.in_engine`).
   Probe workloads make steps of every size: single prefills from 16 to 2,048 tokens and decode
   batches of 4 to 64 requests, each served several times.
2. the steps' wall time, served untimed, minus the ops' predictions scaled by those ratios -> the
   per-step overhead (`dooly.predict.overhead`): the scheduler, input preparation, sampling and the
   Python between ops. The probes and a mixed workload (requests arriving while others decode) are
   served for it.
Both are written in one transaction: an interrupted calibration leaves the database as it was.
"""

from __future__ import annotations

import time
import pandas as pd

from dooly.deployment import Deployment
from dooly.engine_interface import get_engine
from dooly.errors import DoolyError
from dooly.records import FREE, IN_PROCESS_OPTIONS

CALIBRATION_MODELS = ("dooly/tiny-llama", "dooly/tiny-llama-deep")
# served as requests arrive (prefill, mixed and decode steps of many sizes), after a warm-up
CALIBRATION_WORKLOAD = "n=48,prompt=uniform:8:600,output=uniform:4:64,arrivals=poisson:12"
# steps of every size: one prefill of each length, then decode batches (their prefills are sizes too)
CALIBRATION_PROBES = tuple(f"n=1,prompt={p},output=2,arrivals=burst" for p in (16, 32, 64, 128, 256, 512, 1024, 2048)) \
    + tuple(f"n={k},prompt=16,output=8,arrivals=burst" for k in (4, 16, 64))
TIMED_REPEATS = 3  # each probe served this many times with its ops timed
WALL_REPEATS = 2  # each probe and the mixed workload served this many times untimed


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


def _profile_command(models, tensor_parallel_size: int, url: str) -> str:
    tp = f" --tp {tensor_parallel_size}" if tensor_parallel_size > 1 else ""
    return f"dooly profile {' '.join(models)}{tp} --db {url}"


def _step_predictors(database, env, deployments, traces):
    """Each model's isolated-op predictor; a model whose ops the database lacks stops calibration here,
    before an engine starts, naming the command that measures them."""
    from dooly.predict.predictor import Predictor
    from dooly.predict.step import StepPredictor

    models = [d.model for d in deployments]
    try:
        predictor = Predictor(database, env)
        return [StepPredictor(t, predictor, overhead=False, in_engine=False) for t in traces]
    except DoolyError as e:
        raise DoolyError(f"calibration needs the ops of {', '.join(models)} measured in this environment "
                         f"({str(e).split(';')[0]}); measure them with: "
                         f"{_profile_command(models, deployments[0].tensor_parallel_size, database.shown_url)}") from None


def _family_samples(engine, steps, timed, isolated, resident: float) -> list:
    from dooly.predict.in_engine import RatioSample, family_times

    out = []
    for s, in_engine in zip(steps, family_times(engine, steps, timed)):
        for family, predicted_us in isolated(s.batch).by_family.items():
            if family != FREE:
                out.append(RatioSample(family, s.batch.num_tokens, in_engine.get(family, 0.0), predicted_us, resident))
    return out


def calibrate(db: str | None = None, models=CALIBRATION_MODELS, dtype: str = "bfloat16",
              threads: int | None = None, seed: int = 0, tensor_parallel_size: int = 1) -> pd.DataFrame:
    """Measure the real engine's in-engine op ratios and per-step overhead here; store them.

    With `tensor_parallel_size` K > 1 the engine runs K workers in their own processes, where the ops
    are not timed: only the overhead (scheduling, broadcasting the step to the workers, ...) is
    stored under that TP environment. Returns one row per untimed served step: model, batch point,
    measured, predicted ops (ratios applied) and overhead (microseconds); `attrs["in_engine"]` holds
    the fitted ratios, per family a list of (num_tokens, ratio, p25, p75, steps, residency).
    """
    from dooly.db import LatencyDB
    from dooly.predict.in_engine import InEngineRatios, fit_ratios, ratio_replacements, residency
    from dooly.predict.overhead import overhead_point, overhead_replacement
    from dooly.predict.predictor import Predictor
    from dooly.predict.step import StepPredictor
    from dooly.trace import trace_model
    from dooly.workload import ENGINE_WARMUP, parse_workload

    if not models:
        raise DoolyError("calibration needs at least one model")
    start = time.perf_counter()
    deployments = [Deployment.resolve(m, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                                      options=IN_PROCESS_OPTIONS, threads=threads) for m in models]
    env = deployments[0].env
    database = LatencyDB(db, create=False)  # a missing file: "no database at ... (run `dooly profile` first)"
    traces = [trace_model(d.spec, engine=d.engine, dtype=d.dtype, tensor_parallel_size=d.tensor_parallel_size,
                          cache=True, **d.options.trace_options()) for d in deployments]
    isolated = _step_predictors(database, env, deployments, traces)
    probes = [parse_workload(f"{w},seed={seed + i}") for i, w in enumerate(CALIBRATION_PROBES)]
    mixed = parse_workload(f"{CALIBRATION_WORKLOAD},seed={seed}")
    warmup = parse_workload(f"{ENGINE_WARMUP},seed={seed + 1}")
    samples, served = [], []
    for d, trace, iso in zip(deployments, traces, isolated):
        engine, vocab = get_engine(d.engine), d.spec.config["vocab_size"]
        with engine.running_engine(d.spec.config, dtype=d.dtype, kv_cache_gib=d.options.kv_cache_gib,
                                   tensor_parallel_size=d.tensor_parallel_size, threads=d.threads,
                                   **d.engine_kwargs()) as llm:
            engine.serve(llm, warmup, vocab)
            if d.tensor_parallel_size == 1:
                resident = residency(trace, engine)
                for _ in range(TIMED_REPEATS):
                    for w in probes:
                        llm.reset_prefix_cache()
                        with engine.time_ops(llm) as timed:
                            steps = engine.serve(llm, w, vocab)[1]
                        samples += _family_samples(engine, steps, timed, iso, resident)
            steps = []
            for _ in range(WALL_REPEATS):
                for w in probes + [mixed]:
                    llm.reset_prefix_cache()
                    steps += engine.serve(llm, w, vocab)[1]
        served.append((d, trace, steps))
    curves = fit_ratios(samples)
    rows, residuals = [], []
    for d, trace, steps in served:
        ratios = InEngineRatios(curves, residency(trace, get_engine(d.engine)))
        step_ops = StepPredictor(trace, Predictor(database, env), overhead=False, in_engine=ratios)
        for s in steps:
            measured_us, ops_us = (s.end_s - s.start_s) * 1e6, step_ops(s.batch).us
            point = overhead_point(trace, s.batch)
            residuals.append((point, measured_us - ops_us))
            rows.append({"model": d.model, **point, "measured_us": measured_us, "ops_us": ops_us,
                         "overhead_us": measured_us - ops_us})
    cost_s = time.perf_counter() - start
    database.replace_measurements(env, ratio_replacements(curves, cost_s / 2)
                                  + [overhead_replacement(residuals, cost_s / 2)])
    out = pd.DataFrame(rows)
    out.attrs["in_engine"] = curves
    return out
