"""Distributed profiling: a plan's missing points split across Ray workers writing to one database.

    ProfilePlan ──> shards (cost-balanced) ──> Ray tasks: run_profile(shard, run_id=R) ──> database
         └──────────── one run row R, its books kept here from what the database holds ─────┘

Each task is one worker on its own device (`env.threads` cores; a collective shard the cores of
its whole group). It checks that it measures in the plan's environment, then runs the ordinary
profiler on its shard under the shared run id. The guarantees are the profiler's own, per worker:
a point is stored, committed, as soon as it is measured, keyed by (environment, signature,
point) with insert-or-ignore, and looked up just before it is measured. A worker that dies loses
only the point it was measuring; Ray reruns its task, which skips every point already stored.
Totals are counted from the database (the points stored under the run), so they are right
whichever attempts died. If a task fails for good, what was stored stays and the same command
resumes it.

SQLite works for a local Ray instance (every worker opens the same file); a cluster whose workers
run on other machines needs a database they all reach (PostgreSQL), and is refused otherwise.
"""

from __future__ import annotations

import copy
import heapq
import time
from typing import Callable

from dooly.cluster import describe, ray_session, task_result
from dooly.db import LatencyDB, parse_point
from dooly.errors import DoolyError
from dooly.profile.runner import COLLECTIVE, ProfilePlan, ProfileSummary, _estimate_point_s, run_profile

SHARDS_PER_WORKER = 2  # a little slack for balancing; a retried shard skips what it stored anyway
RETRIES = 3  # reruns of a task whose worker died


def shard(plan: ProfilePlan, n: int) -> list[ProfilePlan]:
    """The plan's missing points in at most `n` shards of near-equal estimated cost (largest point
    first onto the least-loaded shard), collectives in one shard of their own (one group measures
    them all). Each shard is a plan holding only its points, in the plan's order."""
    missing = plan.missing
    collective = [(w, p) for w, p in missing if w.kind == COLLECTIVE]
    rest = sorted(((_estimate_point_s(w.text, parse_point(p)), w.signature, p) for w, p in missing
                   if w.kind != COLLECTIVE), key=lambda c: -c[0])
    n = max(1, min(n, len(rest)))
    heap = [(0.0, i) for i in range(n)]
    parts: list[set] = [set() for _ in range(n)]
    for cost, signature, p in rest:
        load, i = heapq.heappop(heap)
        parts[i].add((signature, p))
        heapq.heappush(heap, (load + cost, i))
    if collective:
        parts.append({(w.signature, p) for w, p in collective})
    return [_restrict(plan, part) for part in parts if part]


def _restrict(plan: ProfilePlan, keep: set) -> ProfilePlan:
    work = []
    for w in plan.work:
        pts = [p for p in w.points if (w.signature, p) in keep]
        if pts:
            part = copy.copy(w)
            part.points = pts
            work.append(part)
    return ProfilePlan(plan.env, plan.grid, plan.limits, plan.models, work, needs={}, stored={}, deferred={})


def resources(plan: ProfilePlan) -> dict:
    """What one shard's task asks Ray for: the cores (or GPU) one measurement uses, times the group
    size for collectives."""
    ranks = max((w.attrs.get("world_size", 1) for w in plan.work if w.kind == COLLECTIVE), default=1)
    if plan.env.device == "cpu":
        return {"num_cpus": plan.env.threads * ranks}
    return {"num_gpus": ranks, "num_cpus": 1}


def profile_shard(db_url: str, part: ProfilePlan, run_id: int) -> dict:
    """One Ray task: check this worker's environment, then profile the shard under `run_id`."""
    import platform

    from dooly.engine_interface import get_engine
    from dooly.profile.environment import current_environment

    env = part.env
    here = current_environment(env.engine, get_engine(env.engine).version(), env.dtype, env.threads,
                               env.tensor_parallel_size)
    if here.key != env.key:
        diff = "; ".join(f"{k}: worker {a!r}, plan {b!r}" for k, (a, b) in here.differences(env).items())
        raise DoolyError(f"the Ray worker on {platform.node()} measures in another environment ({diff})")
    summary = run_profile(part, LatencyDB(db_url, create=False), run_id=run_id)
    return {"failed": summary.failed, "measured": summary.points_measured, "host": platform.node()}


def run_distributed(plan: ProfilePlan, db: LatencyDB, address: str | None = None,
                    progress: Callable[[str, int, int], None] | None = None) -> ProfileSummary:
    """Measure what the plan lacks on Ray workers (a local instance when `address` is None or
    "local"), every worker writing to `db`. Returns the run's summary, counted from the database."""
    todo = {(w.signature, p) for w, p in plan.missing}
    if not todo:  # nothing to fan out: the run is recorded as any other
        return run_profile(plan, db)
    env_key = db.ensure_environment(plan.env)
    db.add_signatures({w.signature: (w.op, w.text) for w in plan.work})
    with ray_session(address) as ray:
        _check_shared(ray, db)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = max(1, cpus // plan.env.threads) if plan.env.device == "cpu" else \
            max(1, int(ray.cluster_resources().get("GPU", 0)))
        parts = shard(plan, workers * SHARDS_PER_WORKER)
        _check_fits(ray, [resources(p) for p in parts])
        run_id = db.start_run(env_key, plan.models)
        status, error, failed = "interrupted", None, {}
        try:
            pending = {ray.remote(profile_shard).options(max_retries=RETRIES, **resources(p))
                       .remote(db.url, p, run_id): p for p in parts}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    pending.pop(ref)
                    try:
                        failed.update(task_result(ray, ref)["failed"])
                    except DoolyError as e:  # the others go on: what they store is kept
                        error = error or str(e)
                if progress:
                    measured, _ = db.run_totals(run_id)
                    progress(f"{len(pending)} of {len(parts)} shards on Ray ({describe(address)})",
                             measured, len(todo))
            status = "interrupted" if error is not None else "incomplete" if failed else "done"
        finally:
            summary, lost = _books(plan, db, env_key, run_id, failed, status)
    if error is not None:
        raise DoolyError(f"{error.rstrip('.')} ({summary.points_measured} points stored, {lost} not: "
                         f"run the same command again to resume)")
    return summary


def _check_fits(ray, asks: list[dict]) -> None:
    """A task no node can hold would wait forever: say so before any work."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for kind, name in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
        need = max((a.get(kind, 0) for a in asks), default=0)
        most = max((n.get(name, 0) for n in nodes), default=0)
        if need > most:
            raise DoolyError(f"a profiling task needs {need:g} {name}s on one node (a worker's threads, or a "
                             f"tensor-parallel group's); the largest node of this Ray cluster has {most:g}")


def _check_shared(ray, db: LatencyDB) -> None:
    """A SQLite file is one machine's: refuse it when the cluster has workers elsewhere."""
    if not db.url.startswith("sqlite"):
        return
    here = ray.util.get_node_ip_address()
    others = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")} - {here}
    if others:
        raise DoolyError(f"the Ray cluster has nodes on other machines ({', '.join(sorted(others))}) that cannot "
                         f"write this SQLite file: use a PostgreSQL database (--db postgresql+psycopg://...)")


def _books(plan: ProfilePlan, db: LatencyDB, env_key: str, run_id: int, failed: dict,
           status: str) -> tuple[ProfileSummary, int]:
    """The run's totals from what the database holds (right whichever attempts died), and the
    number of points still missing that no failed signature explains."""
    measured, spent = db.run_totals(run_id)
    stored = db.points(env_key)
    baseline = sum(stored[k].cost_s for need in plan.needs.values() for k in need if k in stored)
    reused, resumed, resumed_s = plan.kept()
    db.update_run(run_id, finished=time.time(), measured=measured, reused=reused, device_s=spent,
                  baseline_s=baseline, status=status)
    todo = {w.signature for w, _ in plan.missing}
    lost = sum(1 for w, p in plan.missing if (w.signature, p) not in stored and w.signature not in failed)
    return ProfileSummary(
        models=plan.models, signatures=len(plan.work),
        signatures_measured=len(todo - set(failed)), signatures_reused=len(plan.work) - len(todo),
        points_measured=measured, points_reused=reused, device_s=spent, baseline_s=baseline, failed=failed,
        points_resumed=resumed, resumed_s=resumed_s,
        deferred=len(plan.deferred), run_id=run_id), lost
