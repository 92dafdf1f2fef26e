"""Simulating a deployment end to end: the model's cached trace, the predictor on the deployment's
environment, the engine's scheduling policy in virtual time, and the metrics (the `dooly simulate` stage).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from dooly.deployment import Deployment
from dooly.engine_interface import get_engine
from dooly.errors import DoolyError
from dooly.records import DEFAULT_OPTIONS, EngineOptions
from dooly.workload import parse_workload

SCHEDULERS = ("fast", "vllm")


@dataclass
class SimulationResult:
    summary: pd.DataFrame  # one row per metric: mean, p50, p90, p99 (seconds), throughput rows
    requests: pd.DataFrame  # one row per request: ttft, tpot, e2e, ...
    steps: pd.DataFrame  # one row per engine step: batch composition and predicted latency


def model_context(deployment: Deployment, db: str | None):
    """What predicting a deployment's steps needs: (its model's cached trace, a predictor on its
    environment); fails in one line when the trace holds ops this machine cannot measure."""
    from dooly.db import LatencyDB
    from dooly.predict import Predictor
    from dooly.predict.step import profile_command
    from dooly.profile.profilable import refuse_unprofilable
    from dooly.trace import trace_model

    d = deployment
    trace = trace_model(d.spec, engine=d.engine, dtype=d.dtype, tensor_parallel_size=d.tensor_parallel_size,
                        cache=True, **d.options.trace_options())
    refuse_unprofilable(trace, "predict")
    database = LatencyDB(db, create=False)
    try:
        predictor = Predictor(database, d.env)
    except DoolyError as e:  # nothing measured in this environment
        raise DoolyError(f"{e}; fill them with: {profile_command(trace, database.shown_url)}") from None
    return trace, predictor


def make_scheduler(deployment: Deployment, kind: str = "fast"):
    """"fast": dooly's re-implementation of vLLM's policy (tested to make the same batches); "vllm":
    the engine's own scheduler and KV-cache manager driven in virtual time (slower)."""
    from dooly.sim.scheduler import FastScheduler

    d = deployment
    if kind == "fast":
        return FastScheduler.for_deployment(d)
    if kind == "vllm":
        return get_engine(d.engine).scheduler(d.spec.config, d.dtype, num_blocks=d.num_blocks,
                                              **d.options.engine_kwargs(d.tensor_parallel_size))
    raise DoolyError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {kind!r}")


def simulate(model: str, workload, *, db: str | None = None, dtype: str = "bfloat16", tensor_parallel_size: int = 1,
             options: EngineOptions = DEFAULT_OPTIONS, num_gpu_blocks: int | None = None, threads: int | None = None,
             scheduler: str = "fast", **engine_options) -> SimulationResult:
    """Simulate serving `model` on vLLM (this machine's engine) for `workload`, from the database.

    Engine options come from `options` (`EngineOptions`), with any of its fields given by name on top
    (`max_num_seqs=8`); `num_gpu_blocks` replaces the KV blocks the options' KV space gives."""
    if scheduler not in SCHEDULERS:
        raise DoolyError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    deployment = Deployment.resolve(model, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                                    options=options.replace(**engine_options), threads=threads,
                                    num_blocks=num_gpu_blocks)
    return simulate_deployment(deployment, workload, db=db, scheduler=scheduler)


def simulate_deployment(deployment: Deployment, workload, *, db: str | None = None, scheduler: str = "fast",
                        context: tuple | None = None, time_scale: float = 1.0) -> SimulationResult:
    """Simulate a resolved deployment; `context`: its `model_context`, if already built; `time_scale`:
    every predicted step takes this many times longer (a machine measured slower now than when its
    database was taken, `dooly.profile.sentinels`)."""
    from dooly.predict import StepPredictor
    from dooly.sim.core import simulate as run
    from dooly.sim.metrics import requests_frame, steps_frame, summary

    trace, predictor = context or model_context(deployment, db)
    sched = make_scheduler(deployment, scheduler)
    requests = parse_workload(workload, deployment.max_model_len)
    deployment.check_fits(requests)
    step = StepPredictor(trace, predictor)
    results, steps = run(requests, sched, lambda batch: time_scale * step(batch).us / 1e6,
                         vocab=deployment.spec.config["vocab_size"])
    predictor.save_fits()
    return SimulationResult(summary(results), requests_frame(results), steps_frame(steps))


def write_simulation(result: SimulationResult, out, plot: bool = False) -> None:
    """requests.csv, steps.csv and summary.json (and, with `plot`, the plots) into folder `out`."""
    from pathlib import Path

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    result.requests.to_csv(folder / "requests.csv", index=False)
    result.steps.to_csv(folder / "steps.csv", index=False)
    result.summary.to_json(folder / "summary.json", orient="records", indent=1)
    if plot:
        from dooly.sim.plots import write_plots

        write_plots(result, folder)
