"""Running configurations in-process or as Ray tasks, with the same results either way.

Ray: configurations are sorted by what their step predictor depends on (model, dtype, tp, backend)
and cut into contiguous chunks, a few per worker, each one task; a task builds its `Workbench` once
(trace, regressors, memoised step parts) and evaluates its chunk. Every configuration is evaluated
by a function of itself and the job alone, and the rows come back in configuration order, so the
result does not depend on where, in which chunk or in what order a configuration ran.

A local Ray instance is started when Ray is importable and no address is given (sized to this
machine's cores, no dashboard, worker logs not forwarded) and shut down afterwards; `address`
connects to a running cluster (checked to be reachable before any work); Ray absent, or
`use_ray=False`, runs in-process.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Callable

from dooly.errors import DoolyError
from dooly.search.grid import Configuration
from dooly.search.sweep import Job, Workbench, evaluate_configuration

CHUNKS_PER_WORKER = 4  # more chunks balance the load; fewer build fewer workbenches and reuse more simulations


def run_chunk(job: Job, configs: list[Configuration]) -> list[tuple[dict, list[dict], int]]:
    bench = Workbench(job)
    return [evaluate_configuration(bench, c) for c in configs]


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which a container may narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def check_address(address: str) -> None:
    """A Ray address that cannot be reached fails here, in one line, before any work (ray.init would
    retry for tens of seconds). HOST:PORT is asked for its cluster id over gRPC, as Ray's GCS is:
    anything but a Ray GCS (nothing listening, or another server) fails; ray://HOST:PORT (Ray
    client) must accept a connection."""
    if address in ("auto", "local"):
        return
    client = address.startswith("ray://")
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise DoolyError(f"bad Ray address {address!r}: use HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as e:
        raise DoolyError(f"cannot reach a Ray cluster at {address}: {e.strerror or e}") from None
    if client:
        return
    import grpc

    channel = grpc.insecure_channel(hostport)
    try:
        channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")(b"", timeout=5)
    except grpc.RpcError as e:
        code = e.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED):
            why = "no Ray GCS answers there" if code == grpc.StatusCode.UNIMPLEMENTED else code.name.lower()
            raise DoolyError(f"cannot reach a Ray cluster at {address}: {why}") from None
        # any other answer (e.g. unauthenticated) comes from a GCS: ray.init takes it from here
    finally:
        channel.close()


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
    import ray

    started = False
    if not ray.is_initialized():
        if address is not None:
            check_address(address)
        try:
            if address is None:
                ray.init(num_cpus=usable_cores(), include_dashboard=False, log_to_driver=False,
                         logging_level=logging.ERROR)
            else:
                ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        except Exception as e:  # noqa: BLE001 - Ray raises many kinds; the user needs one line
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DoolyError(f"could not start Ray{' at ' + address if address else ''}: {msg}") from None
        started = True
    try:
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
                for i, res in zip(part, _get(ray, ref)):
                    results[i] = res
                done += len(part)
                if progress:
                    progress(done, len(configs))
        where = f"ray ({workers} workers{', ' + address if address else ', local'})"
        return results, where
    finally:
        if started:
            ray.shutdown()


def _get(ray, ref):
    """A task's result; a task's failure as one line (the DoolyError it raised, else its last line)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, DoolyError):
            raise DoolyError(str(cause)) from None
        lines = [line for line in str(cause or e).strip().splitlines() if line.strip()]
        raise DoolyError(f"a Ray worker failed: {lines[-1] if lines else type(e).__name__}") from None
