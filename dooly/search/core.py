"""`search` (goodput of every configuration of a grid under an SLO) and `capacity` (replicas for a rate).

    parse SLO ─ parse grid ─ check Ray address ─ validate (values, vLLM's config checks, traces)
      ─ evaluate configurations (in-process or Ray tasks; `sweep.evaluate_configuration`)
      ─ DataFrames: configurations best first, every simulated rate
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import pandas as pd

from dooly.cluster import check_address
from dooly.errors import DoolyError
from dooly.search.grid import DEFAULT_GRID, Configuration, configurations, engine_check, parse_grid
from dooly.search.slo import Slo, parse_slo
from dooly.search.sweep import Job, Sweep

MET = ("ok", "capped")  # statuses of configurations that meet the SLO at some rate
_STATUS_ORDER = {"ok": 0, "capped": 0, "infeasible": 1, "rejected": 2, "missing": 3}


@dataclass
class SearchResult:
    configs: pd.DataFrame  # one row per configuration, best first (goodput per device, then latency)
    rates: pd.DataFrame  # one row per simulated (configuration, rate)
    slo: Slo
    sweep: Sweep
    ran_on: str  # "in-process" or "ray (N workers, ...)"
    seconds: float  # wall time of the search (not in the frames: they are deterministic)
    simulated: int  # simulations run (the frames' other rates reused one: where depends on the chunks)

    @property
    def met(self) -> pd.DataFrame:
        return self.configs[self.configs["status"].isin(MET)]

    @property
    def best(self) -> pd.Series | None:
        met = self.met
        return None if met.empty else met.iloc[0]


def _as_grid(grid) -> dict:
    if grid is None:
        return dict(DEFAULT_GRID)
    if isinstance(grid, dict):
        return parse_grid([f"{k}={','.join(str(v).lower() if isinstance(v, bool) else str(v) for v in vs)}"
                           for k, vs in grid.items()])
    return parse_grid(list(grid))


def _lengths(workload, requests: int | None) -> tuple:
    from dooly.workload import parse_workload

    reqs = parse_workload(workload)
    if requests is not None:
        if requests <= 0:
            raise DoolyError(f"requests must be > 0, got {requests}")
        reqs = reqs[:requests]
    return tuple((r.prompt_tokens, r.output_tokens) for r in reqs)


def _check_lengths(lengths: tuple, configs: list[Configuration]) -> None:
    from dooly.catalog import resolve
    from dooly.deployment import scheduler_settings

    longest = max(range(len(lengths)), key=lambda i: sum(lengths[i]))
    for model in dict.fromkeys(c.model for c in configs):
        c = next(c for c in configs if c.model == model)
        max_len = scheduler_settings(resolve(model).config, c.dtype, **c.engine_kwargs())["max_model_len"]
        p, o = lengths[longest]
        if p + o > max_len:
            raise DoolyError(f"workload request {longest}: {p} + {o} tokens exceed the max length {max_len} of {model}")


def _prepare_traces(configs: list[Configuration]) -> None:
    """Trace every (model, dtype, tp, backend) once here, filling the disk cache the workers read."""
    from dooly.catalog import resolve
    from dooly.trace import trace_model

    for model, dtype, tensor_parallel_size, backend, kv_cache_dtype, quantization in \
            dict.fromkeys(c.trace_key for c in configs):
        trace_model(
            resolve(model),
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            attention_backend=backend,
            kv_cache_dtype=kv_cache_dtype,
            quantization=quantization,
            cache=True,
        )


def _check_data(configs: list[Configuration], job: Job) -> None:
    """The database holds measurements for some configuration, checked before any simulation: when it
    holds none, that is an error naming the `dooly profile` commands that fill it, never an SLO
    result. (Configurations lacking data among others that have it are listed as "missing", with
    their command; `missing_data` says so before any verdict.)"""
    from dooly.db import redact
    from dooly.search.sweep import Workbench, profile_command

    bench = Workbench(job)
    missing = {}
    for c in {c.trace_key: c for c in configs}.values():
        try:
            bench.step_predictor(c).predictor.save_fits()
        except DoolyError as e:
            missing.setdefault(profile_command(e, c, redact(job.db_url)), []).append(c.key)
    if sum(len(v) for v in missing.values()) == len(configs):
        raise DoolyError(f"the database lacks measurements for every configuration "
                         f"({', '.join(k for v in missing.values() for k in v)}); fill them with: "
                         + " && ".join(missing))


def missing_data(result: "SearchResult") -> str | None:
    """What the database lacks for the search's configurations, as one sentence naming the
    `dooly profile` commands that fill it; None when every configuration had its data."""
    rows = result.configs[result.configs["status"] == "missing"]
    if rows.empty:
        return None
    commands = list(dict.fromkeys(rows["reason"]))
    return (f"{len(rows)} of {len(result.configs)} configurations lack measurements "
            f"({', '.join(rows['config'])}); fill them with: " + " && ".join(commands))


def search(models, workload, slo, grid=None, *, db: str | None = None, requests: int | None = None,
           rate_min: float = 0.05, rate_max: float = 1000.0, tolerance: float = 0.05, seed: int = 0,
           early_stop: bool = True, reuse: bool = True, use_ray: bool | None = None, ray_address: str | None = None,
           progress: Callable[[int, int], None] | None = None) -> SearchResult:
    """Goodput (highest Poisson rate meeting `slo`) of every model x grid configuration.

    models: one id/path or a list; workload: a synthetic spec or file (its request lengths are used,
    its arrivals replaced); slo: "ttft_p99=500ms,..." or a parsed `Slo`; grid: {option: values},
    ["option=v1,v2", ...] or None (`grid.DEFAULT_GRID`); use_ray: None = Ray when importable."""
    from dooly.db import LatencyDB
    from dooly.search import fanout

    start = time.perf_counter()
    models = list(dict.fromkeys([models] if isinstance(models, str) else models))
    slo = parse_slo(slo) if isinstance(slo, str) else slo
    grid = _as_grid(grid)
    sweep = Sweep(rate_min, rate_max, tolerance, seed, early_stop, reuse)
    if ray_address is not None:
        if use_ray is False:
            raise DoolyError("a Ray address and running without Ray exclude each other")
        check_address(ray_address)
    database = LatencyDB(db, create=False)
    lengths = _lengths(workload, requests)
    configs = configurations(models, grid)
    rejected = engine_check(configs, grid)  # vLLM's own checks: the slowest validation, the last
    accepted = [c for c in configs if c.key not in rejected]
    _check_lengths(lengths, accepted)
    _prepare_traces(accepted)
    job = Job(database.url, lengths, slo, sweep)
    _check_data(accepted, job)
    results, ran_on = fanout.run(accepted, job, use_ray=use_ray, address=ray_address, progress=progress)
    rows, rate_rows = [], []
    by_key = {c.key: r for c, r in zip(accepted, results)}
    for c in configs:
        if c.key in rejected:
            rows.append({"config": c.key, "model": c.model, **c.options(), "status": "rejected",
                         "reason": rejected[c.key]})
            continue
        row, per_rate, _ = by_key[c.key]
        rows.append(row)
        rate_rows.extend(per_rate)
    configs_df, rates_df = _configs_frame(rows, slo), _rates_frame(rate_rows, slo)
    simulated = sum(r[2] for r in results)
    return SearchResult(configs_df, rates_df, slo, sweep, ran_on, time.perf_counter() - start, simulated)


def _configs_frame(rows: list[dict], slo: Slo) -> pd.DataFrame:
    options = list(Configuration.__dataclass_fields__)[1:]
    stats = [f"{t.name}_s" for t in slo.targets]
    columns = ["config", "model", *options, "status", "goodput_rps", "goodput_per_device_rps", *stats,
               "simulations", "steps", "reason"]
    blank = {"goodput_rps": 0.0, "goodput_per_device_rps": 0.0, **dict.fromkeys(stats, float("nan")),
             "simulations": 0, "steps": 0, "reason": ""}  # what a missing or rejected configuration has
    df = pd.DataFrame([{**blank, **r} for r in rows]).reindex(columns=columns)
    df["_order"] = range(len(df))
    df["_status"] = df["status"].map(_STATUS_ORDER)
    df = df.sort_values(["_status", "goodput_per_device_rps", stats[0], "_order"],
                        ascending=[True, False, True, True], na_position="last", kind="mergesort")
    return df.drop(columns=["_order", "_status"]).reset_index(drop=True)


def _rates_frame(rows: list[dict], slo: Slo) -> pd.DataFrame:
    columns = ["config", "rate_rps", "met", "stopped_early", "steps", *[f"{t.name}_s" for t in slo.targets]]
    return pd.DataFrame(rows, columns=columns)


def plan_capacity(result: SearchResult, rate: float) -> pd.DataFrame | None:
    """One row: the configuration with the most goodput per device, replicas = ceil(rate / goodput),
    devices = replicas x tensor_parallel_size, margin = replicas x goodput / rate - 1; None when no
    configuration meets the SLO. A "capped" goodput is a lower bound (goodput_is_lower_bound)."""
    if not rate > 0:
        raise DoolyError(f"the rate must be > 0 requests/s, got {rate}")
    best = result.best
    if best is None:
        return None
    goodput = float(best["goodput_rps"])
    replicas = math.ceil(rate / goodput)
    tensor_parallel_size = int(best["tensor_parallel_size"])
    options = {k: best[k] for k in list(Configuration.__dataclass_fields__)[1:]}
    return pd.DataFrame(
        [
            {
                "model": best["model"],
                "config": best["config"],
                "rate_rps": rate,
                "goodput_rps": goodput,
                "goodput_is_lower_bound": bool(best["status"] == "capped"),
                **options,
                "replicas": replicas,
                "devices": replicas * tensor_parallel_size,
                "margin": replicas * goodput / rate - 1,
            }
        ]
    )


def capacity(model: str, rate: float, workload, slo, grid=None, **kwargs) -> tuple[pd.DataFrame, SearchResult]:
    """Search `model`'s configurations, then plan replicas for `rate` (`plan_capacity`).

    Returns (the one-row plan, the search); raises NoConfiguration when no configuration meets the SLO."""
    if not rate > 0:
        raise DoolyError(f"the rate must be > 0 requests/s, got {rate}")
    res = search(model, workload, slo, grid, **kwargs)
    plan = plan_capacity(res, rate)
    if plan is None:
        raise NoConfiguration(res)
    return plan, res


class NoConfiguration(DoolyError):
    """No configuration meets the SLO (the CLI exits 3)."""

    def __init__(self, result: SearchResult):
        self.result = result
        counts = result.configs["status"].value_counts().to_dict()
        super().__init__(f"no configuration meets the SLO {result.slo} ("
                         + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ")")


def write_outputs(result: SearchResult, folder, plot: bool = False) -> list:
    """configs.csv, rates.csv and search.json (SLO, sweep, both tables) in `folder`; pareto.png with plot."""
    import dataclasses
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "configs.csv", folder / "rates.csv", folder / "search.json"]
    result.configs.to_csv(paths[0], index=False)
    result.rates.to_csv(paths[1], index=False)
    doc = {"slo": str(result.slo), "sweep": dataclasses.asdict(result.sweep),
           "configs": json.loads(result.configs.to_json(orient="records")),
           "rates": json.loads(result.rates.to_json(orient="records"))}
    paths[2].write_text(json.dumps(doc, indent=1) + "\n")
    if plot:
        from dooly.search.plots import write_pareto

        paths.append(write_pareto(result, folder / "pareto.png"))
    return paths
