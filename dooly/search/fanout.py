"""Running configurations in-process or as Ray tasks, with the same results either way.

Ray: configurations are sorted by what their step predictor depends on (model, dtype, tp, backend)
and cut into contiguous chunks, a few per worker, each one task; a task builds its `Workbench` once
(trace, regressors, memoised step parts) and evaluates its chunk. Every configuration is evaluated
by a function of itself and the job alone, and the rows come back in configuration order, so the
result does not depend on where, in which chunk or in what order a configuration ran.

A local Ray instance is started when Ray is importable and no address is given, `address`
connects to a running cluster (both through `dooly.cluster.ray_session`); Ray absent, or
`use_ray=False`, runs in-process.
"""

from __future__ import annotations

from typing import Callable

from dooly.cluster import describe, ray_available, ray_session, task_result
from dooly.errors import DoolyError
from dooly.search.grid import Configuration
from dooly.search.sweep import Job, Workbench, evaluate_configuration

CHUNKS_PER_WORKER = 4  # more chunks balance the load; fewer build fewer workbenches and reuse more simulations


def run_chunk(job: Job, configs: list[Configuration]) -> list[tuple[dict, list[dict], int]]:
    bench = Workbench(job)
    return [evaluate_configuration(bench, c) for c in configs]


def chunks(configs: list[Configuration], n: int) -> list[list[int]]:
    """Indices of `configs` in `n` contiguous runs (by trace key, then grid order) of near-equal size."""
    order = sorted(range(len(configs)), key=lambda i: (tuple(map(str, configs[i].trace_key)), i))
    n = max(1, min(n, len(order)))
    size, extra = divmod(len(order), n)
    out, at = [], 0
    for j in range(n):
        k = size + (j < extra)
        out.append(order[at:at + k])
        at += k
    return out


def run(configs: list[Configuration], job: Job, *, use_ray: bool | None = None, address: str | None = None,
        progress: Callable[[int, int], None] | None = None) -> tuple[list[tuple[dict, list[dict], int]], str]:
    """Evaluate every configuration; returns (results in configuration order, where they ran)."""
    if use_ray is None:
        use_ray = address is not None or ray_available()
    if use_ray and not ray_available():
        raise DoolyError("Ray is not installed here (pip install 'dooly[ray]'), or run without Ray (--no-ray)")
    if not use_ray:
        bench = Workbench(job)
        out = []
        for i, c in enumerate(configs):
            out.append(evaluate_configuration(bench, c))
            if progress:
                progress(i + 1, len(configs))
        return out, "in-process"
    return _run_ray(configs, job, address, progress)


def _run_ray(configs, job, address, progress):
    with ray_session(address) as ray:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(num_cpus=1)(run_chunk)
        job_ref = ray.put(job)
        parts = chunks(configs, workers * CHUNKS_PER_WORKER)
        pending = {task.remote(job_ref, [configs[i] for i in part]): part for part in parts}
        results: list = [None] * len(configs)
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                part = pending.pop(ref)
                for i, res in zip(part, task_result(ray, ref)):
                    results[i] = res
                done += len(part)
                if progress:
                    progress(done, len(configs))
        return results, f"ray ({workers} workers, {describe(address)})"
