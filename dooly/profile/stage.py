"""The profile stage's entry: models in, what the database lacks measured, a summary out.

    models ─ trace ─ plan_profile (db lookup) ─ run_profile | run_distributed (Ray) ─ ProfileSummary
"""

from __future__ import annotations

from typing import Callable

from dooly.db import LatencyDB, NoDatabase
from dooly.engine_interface import get_engine
from dooly.errors import DoolyError
from dooly.profile.environment import current_environment, default_threads
from dooly.profile.grid import GRIDS, Limits
from dooly.profile.runner import ProfilePlan, ProfileSummary, cost_scales, plan_profile, run_profile


def plan_models(models: list[str], *, engine: str = "vllm", db: str | None = None, dtype: str = "bfloat16",
                tensor_parallel_size: int = 1, limits: Limits = Limits(), grid: str = "full",
                threads: int | None = None, attention_backend: str | None = None,
                kv_cache_dtype: str | None = None, quantization: str | None = None,
                create_db: bool = True) -> tuple[ProfilePlan, LatencyDB | None]:
    """What profiling `models` would measure here: traces them, and looks up what the database holds.

    create_db=False leaves a missing database missing (a dry run): the plan then reuses nothing."""
    from dooly.catalog import resolve
    from dooly.trace import DTYPES, trace_model

    if dtype not in DTYPES:
        raise DoolyError(f"unknown dtype {dtype!r}; dtypes: {', '.join(DTYPES)}")
    if grid not in GRIDS:
        raise DoolyError(f"unknown grid {grid!r}; grids: {', '.join(GRIDS)}")
    if not models:
        raise DoolyError("give models or --suite NAME")
    specs = [resolve(m) for m in models]
    eng = get_engine(engine)
    existing = _existing(db)  # a file that is not a dooly database is refused before any tracing
    traces = [
        trace_model(
            s,
            engine=engine,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            attention_backend=attention_backend,
            kv_cache_dtype=kv_cache_dtype,
            quantization=quantization,
        )
        for s in specs
    ]
    # opened after tracing: a model or option the engine refuses leaves no database behind
    database = LatencyDB(db) if create_db else existing
    env = current_environment(
        engine, eng.version(), dtype, threads or default_threads(tensor_parallel_size), tensor_parallel_size
    )
    stored = database.points(env.key) if database else {}
    plan = plan_profile(traces, env, stored, grid, limits)
    if database:
        plan.resumed = frozenset(database.unfinished_points(env.key))
        plan.scales = cost_scales(stored, database.signatures({sig for sig, _ in stored}))
    return plan, database


def profile(models: list[str], *, ray_address: str | None = None,
            progress: Callable[[str, int, int], None] | None = None, **options) -> tuple[ProfileSummary, str]:
    """Measure the points of `models` the database lacks (in this process, or split across the
    workers of a Ray cluster at `ray_address`; "local" starts one here). Returns the run's summary
    and the database's URL. `options`: those of `plan_models`."""
    if ray_address is not None:
        from dooly.cluster import check_address, require_ray

        require_ray()
        check_address(ray_address)  # an unreachable cluster fails before any tracing or writing
    if ray_address is None and options.get("tensor_parallel_size", 1) > 1:
        # the ranks measuring collectives here: refused before any tracing, measuring or writing
        tp = options["tensor_parallel_size"]
        collectives = get_engine(options.get("engine", "vllm")).collectives
        if collectives is not None:
            collectives.check_group(tp, options.get("threads") or default_threads(tp))
    plan, database = plan_models(models, **options)
    if ray_address is None:
        return run_profile(plan, database, progress), database.url
    from dooly.profile.distributed import run_distributed

    return run_distributed(plan, database, ray_address, progress), database.url


def _existing(url: str | None) -> LatencyDB | None:
    try:
        return LatencyDB(url, create=False)
    except NoDatabase:
        return None
