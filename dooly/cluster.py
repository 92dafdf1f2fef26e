"""Ray plumbing shared by the stages that fan out (search's simulations, distributed profiling).

`ray_session(address)` yields a connected Ray: a new local instance when `address` is None or
"local" (sized to this machine's usable cores, no dashboard, worker logs not forwarded, shut down
afterwards), or the cluster at `address`, checked to be reachable first so that a wrong address
fails in one line instead of after Ray's tens of seconds of retries. `task_result(ref)` turns a
task's failure into one line.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager

from dooly.errors import DoolyError

LOCAL = "local"  # start a Ray instance on this machine


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


def require_ray() -> None:
    if not ray_available():
        raise DoolyError("Ray is not installed here (pip install 'dooly[ray]')")


def check_address(address: str) -> None:
    """A Ray address that cannot be reached fails here, in one line, before any work (ray.init would
    retry for tens of seconds). HOST:PORT is asked for its cluster id over gRPC, as Ray's GCS is:
    anything but a Ray GCS (nothing listening, or another server) fails; ray://HOST:PORT (Ray
    client) must accept a connection."""
    if address in ("auto", LOCAL):
        return
    client = address.startswith("ray://")
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise DoolyError(f"bad Ray address {address!r}: use HOST:PORT, ray://HOST:PORT, auto or local")
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


@contextmanager
def ray_session(address: str | None = None):
    """Yields the `ray` module, connected. Reuses a connection the caller already made."""
    require_ray()
    import ray

    if ray.is_initialized():
        yield ray
        return
    if address is not None:
        check_address(address)
    try:
        if address in (None, LOCAL):
            ray.init(num_cpus=usable_cores(), include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR)
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except Exception as e:  # noqa: BLE001 - Ray raises many kinds; the user needs one line
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = f" at {address}" if address not in (None, LOCAL) else ""
        raise DoolyError(f"could not start Ray{where}: {msg}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def describe(address: str | None) -> str:
    return "local" if address in (None, LOCAL) else address


def task_result(ray, ref):
    """A task's result; a task's failure as one line (the DoolyError it raised, else its last line)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, DoolyError):
            raise DoolyError(str(cause)) from None
        lines = [line for line in str(cause or e).strip().splitlines() if line.strip()]
        raise DoolyError(f"a Ray worker failed: {lines[-1] if lines else type(e).__name__}") from None
    except ray.exceptions.RayError as e:  # the worker or its node died, the task was cancelled, ...
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        raise DoolyError(f"a Ray worker failed: {lines[0] if lines else type(e).__name__}") from None
