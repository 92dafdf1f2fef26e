"""Collectives of a tensor-parallel step, timed with vLLM's own CPU communicator between real ranks.

    profiler ──JSON over one pipe per rank──> rank 0 … rank k-1        (started once per profile run)

Each rank is a spawned process set up as vLLM's CPU worker sets itself up:
  - its OpenMP threads bound by vLLM's `OMPProcessManager` (the env the engine's executor gives a
    worker); with VLLM_CPU_OMP_THREADS_BIND unset or "auto", rank r gets its own `threads` cores;
  - `VLLM_DIST_IDENT` from the init file's name, `vllm._custom_ops` loaded, then
    `init_distributed_environment(..., backend="gloo")` and `ensure_model_parallel_initialized(k, 1)`,
    so the TP group's device communicator is `CpuCommunicator` over `_CPUSHMDistributed`
    (`_C::shm_*` ops; gloo only for set-up and for the profiler's own bookkeeping).
Per point, every rank builds the signature's inputs, makes the call the model makes (registered per
op below), checks that it issues exactly the signature's op, warms up, then times iterations each
started by a 1-element shared-memory all-reduce (all ranks leave it within a cache-line transfer).
A point's latency per iteration is that of the slowest rank; its median / p25 / p75 are stored.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable

from dooly.db import Measurement, point_key
from dooly.errors import DoolyError
from dooly.registry import registrar

SHM_TRANSPORT = "_CPUSHMDistributed"  # the environment key names it "cpu-shm"
WARMUP = 5
MAX_REPEATS = 200
MIN_REPEATS = 5
START_TIMEOUT_S = 900  # importing vLLM in every rank on a loaded machine is slow
POINT_TIMEOUT_S = 300

# op -> make(args, world_size) -> (tensor the model's producer writes, the call the model makes)
_CALLS: dict[str, Callable] = {}


collective_call = registrar(_CALLS, "collective call")


@collective_call("_C::shm_allreduce")
def _all_reduce(args, world_size):
    # _C::shm_allreduce(handle, x [num_tokens, hidden_size]): a row-parallel layer's partial sums,
    # reduced in place by what the layer calls
    from vllm.distributed.communication_op import tensor_model_parallel_all_reduce

    x = args[1]
    return x, lambda: tensor_model_parallel_all_reduce(x)


@collective_call("_C::shm_all_gather")
def _all_gather(args, world_size):
    # _C::shm_all_gather(handle, x [n, d], out [world_size*n, d]); gathered along dim 0 the
    # communicator issues exactly this op (other dims add a reshape copy the trace lists on its own)
    from vllm.distributed.communication_op import tensor_model_parallel_all_gather

    x, out = args[1], args[2]
    if out.shape[0] != world_size * x.shape[0]:
        raise ValueError(f"all_gather output {list(out.shape)} is not {world_size} x input {list(x.shape)}: "
                         f"the trace is for another tensor-parallel degree")
    return x, lambda: tensor_model_parallel_all_gather(x, dim=0)


COLLECTIVE_OPS = frozenset(_CALLS)


@dataclass
class RankInfo:
    """What one rank really ran with (returned so that callers can check the set-up)."""

    rank: int
    world_size: int
    communicator: str  # class of the TP group's device communicator (CpuCommunicator)
    transport: str  # class doing the data movement (_CPUSHMDistributed, or the torch.distributed fallback)
    threads: int  # torch intra-op threads in the rank
    cpus: list  # cores the rank's main thread is bound to
    issued: list = field(default_factory=list)  # non-metadata ops the last measured call issued


# -- the parent side -----------------------------------------------------------------------------


class CollectiveProfiler:
    """A TP group of `world_size` real ranks, started at the first point and kept for the run."""

    def __init__(self, world_size: int, threads: int = 1):
        if world_size < 2:
            raise DoolyError(f"collectives need a tensor-parallel group of 2 or more ranks, got {world_size}")
        self.world_size, self.threads = world_size, threads
        self.ranks: list[RankInfo] = []
        self._procs: list = []
        self._conns: list = []
        self._folder: str | None = None
        self._ident = ""
        self._broken: str | None = None  # why the group cannot measure (set once, re-raised after)
        self._startup_s = 0.0  # charged to the first point measured after start-up

    def __enter__(self) -> "CollectiveProfiler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> list[RankInfo]:
        if self._broken:
            raise DoolyError(self._broken)
        if self._procs:
            return self.ranks
        import multiprocessing as mp

        t0 = time.perf_counter()
        ctx = mp.get_context("spawn")
        _remove_orphaned_segments()
        self._folder = tempfile.mkdtemp(prefix="dooly-tp-")
        self._ident = f"{_SEGMENT_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        init = f"file://{self._folder}/{self._ident}"
        try:
            manager = _omp_manager(self.world_size, self.threads)
            for rank in range(self.world_size):
                parent, child = ctx.Pipe()
                with manager.configure_omp_envs(rank=rank, local_rank=rank):
                    p = ctx.Process(target=_rank_main, args=(rank, self.world_size, init, child), daemon=True,
                                    name=f"dooly-tp-rank{rank}")
                    p.start()
                child.close()
                self._procs.append(p)
                self._conns.append(parent)
            self.ranks = [RankInfo(**r["ready"]) for r in self._replies(START_TIMEOUT_S)]
        except DoolyError as e:
            self._fail(f"could not start the tensor-parallel group: {e}")
        except BaseException:  # e.g. interrupted while the ranks start: none of them, nor the folder, stays
            self._kill()
            raise
        # measurements must be of what the environment key names: the shm communicator, `threads` per rank
        fallback = [r.rank for r in self.ranks if r.transport != SHM_TRANSPORT]
        if fallback:
            self._fail(f"vLLM's CPU communicator did not use shared memory on ranks {fallback} "
                       f"({self.ranks[fallback[0]].transport})")
        if any(r.threads != self.threads for r in self.ranks):
            self._fail(f"ranks compute with {[r.threads for r in self.ranks]} threads, not {self.threads} "
                       f"(VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')!r})")
        self._startup_s = time.perf_counter() - t0
        return self.ranks

    def measure(self, signature: str, text: str, point: dict[str, int]) -> Measurement:
        """Time the collective of signature `text` at request values `point` on every rank."""
        self.start()
        task = json.dumps({"text": text, "point": point})
        for conn in self._conns:
            conn.send(task)
        replies = self._replies(POINT_TIMEOUT_S)
        errors = [r["error"] for r in replies if "error" in r]
        if errors:
            raise DoolyError(errors[0])
        r = replies[0]["ok"]
        for info, reply in zip(self.ranks, replies):
            info.issued = reply["ok"]["issued"]
        cost, self._startup_s = r["cost_s"] + self._startup_s, 0.0
        return Measurement(signature, point_key(point), r["median_us"], r["p25_us"], r["p75_us"], r["repeats"], cost)

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(None)
        for p in self._procs:
            p.join(timeout=30)
        self._kill()

    # -- internals ---------------------------------------------------------------------------
    def _replies(self, timeout_s: float) -> list[dict]:
        """One reply from every rank, in rank order. A rank that stops (its reply says `fatal`, it
        exits, or it is silent for `timeout_s`) stops the group: the others may wait on it forever."""
        from multiprocessing.connection import wait

        replies: dict[int, dict] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < self.world_size:
            pending = {self._conns[i]: i for i in range(self.world_size) if i not in replies}
            for conn in wait(list(pending), timeout=1.0):
                i = pending[conn]
                try:
                    replies[i] = json.loads(conn.recv())
                except EOFError:
                    self._fail(f"rank {i} closed its pipe (exit code {self._procs[i].exitcode})")
                if "fatal" in replies[i]:
                    self._fail(replies[i]["fatal"])
            for i, p in enumerate(self._procs):
                if i not in replies and not p.is_alive():
                    self._fail(f"rank {i} exited (code {p.exitcode})")
            if time.monotonic() > deadline:
                self._fail(f"ranks {sorted(set(range(self.world_size)) - set(replies))} gave no answer in "
                           f"{timeout_s:.0f} s")
        return [replies[i] for i in range(self.world_size)]

    def _fail(self, why: str):
        self._broken = why
        self._kill()
        raise DoolyError(why)

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
        if self._ident:  # shared-memory segments of ranks killed mid-run are ours to remove
            _remove_segments(lambda name: name.startswith(self._ident))
        if self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


# vLLM names a group's shared-memory segments after VLLM_DIST_IDENT: ours start with this and the
# profiler's pid, so that segments left by a killed profiler can be told apart and removed later
_SEGMENT_PREFIX = "dooly-tp-"
_SHM = "/dev/shm"


def _remove_segments(match: Callable[[str], bool]) -> None:
    for name in os.listdir(_SHM) if os.path.isdir(_SHM) else []:
        if match(name):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(_SHM, name))


def _remove_orphaned_segments() -> None:
    """Segments of groups whose profiler is gone (killed before it could remove them)."""

    def orphaned(name: str) -> bool:
        pid = name[len(_SEGMENT_PREFIX):].split("-", 1)[0]
        if not name.startswith(_SEGMENT_PREFIX) or not pid.isdigit():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    _remove_segments(orphaned)


def check_group(world_size: int, threads: int) -> None:
    """Refuse, before anything is measured, a group this machine cannot bind: `world_size` ranks of
    `threads` distinct cores each (unless VLLM_CPU_OMP_THREADS_BIND names the cores itself)."""
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") not in ("", "auto"):
        return
    cpus = os.sched_getaffinity(0)
    if len(cpus) < world_size * threads:
        raise DoolyError(f"{world_size} ranks x {threads} threads need {world_size * threads} cores; "
                         f"this process may use {len(cpus)}")


def _omp_manager(world_size: int, threads: int):
    """vLLM's per-worker OpenMP binding for a TP group of `world_size` on this machine.

    vLLM's automatic binding gives each rank a NUMA node; on a machine with fewer nodes than
    ranks (e.g. this 2-core VM) the engine needs VLLM_CPU_OMP_THREADS_BIND="0|1": the same split
    is made here, `threads` distinct cores per rank, unless the variable names its own lists.
    """
    from vllm.config import ParallelConfig, VllmConfig
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    given = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    bind = given
    if given in ("", "auto"):
        check_group(world_size, threads)
        cpus = sorted(os.sched_getaffinity(0))
        bind = "|".join(",".join(str(c) for c in cpus[r * threads:(r + 1) * threads]) for r in range(world_size))
    cfg = VllmConfig(parallel_config=ParallelConfig(tensor_parallel_size=world_size))
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    try:
        return OMPProcessManager(cfg)
    except AssertionError as e:
        raise DoolyError(f"VLLM_CPU_OMP_THREADS_BIND={bind!r}: {e}") from None
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved


# -- the rank side -------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """A rank spinning in a shared-memory wait would outlive a killed profiler; Linux ends it."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _rank_main(rank: int, world_size: int, init_method: str, conn) -> None:
    _die_with_parent()
    from dooly.engines.vllm.setup import quiet_logs

    quiet_logs()  # before this rank imports vLLM, as in the tracer

    code = 0
    try:
        conn.send(json.dumps({"ready": asdict(_init_rank(rank, world_size, init_method))}))
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the profiler is gone
                break
            if msg is None:
                break
            task = json.loads(msg)
            try:
                reply = {"ok": _measure_point(task["text"], task["point"], world_size)}
            except _PointError as e:  # every rank gave up on this point together: the group goes on
                reply = {"error": str(e)}
            conn.send(json.dumps(reply))
    except Exception as e:  # this rank stops; the parent stops the others
        code = 1
        with contextlib.suppress(OSError):
            conn.send(json.dumps({"fatal": f"rank {rank}: {type(e).__name__}: {_first_line(e)}"}))
    if code == 0:
        from vllm.distributed import parallel_state as ps

        ps.destroy_model_parallel()
        ps.destroy_distributed_environment()
    conn.close()
    os._exit(code)  # the interpreter's own teardown of vLLM's modules takes seconds; nothing is left to do


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _init_rank(rank: int, world_size: int, init_method: str) -> RankInfo:
    import torch
    import vllm._custom_ops  # noqa: F401  (registers _C::init_shm_manager: without it vLLM falls back to gloo)
    from vllm.config import ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    # what CPUWorker.init_device does before initialising the distributed environment
    os.environ["VLLM_DIST_IDENT"] = os.path.basename(init_method.removeprefix("file://"))
    cfg = VllmConfig(parallel_config=ParallelConfig(tensor_parallel_size=world_size))
    with set_current_vllm_config(cfg):
        ps.init_distributed_environment(world_size=world_size, rank=rank, distributed_init_method=init_method,
                                        local_rank=rank, backend="gloo")
        ps.ensure_model_parallel_initialized(world_size, 1)
    group = ps.get_tp_group()
    comm = group.device_communicator
    x = torch.ones(64, 64)
    (x @ x).sum()  # one parallel region: the OpenMP runtime has bound this thread by now
    return RankInfo(rank=rank, world_size=group.world_size, communicator=type(comm).__name__,
                    transport=type(comm.dist_module).__name__, threads=torch.get_num_threads(),
                    cpus=sorted(os.sched_getaffinity(0)))


class _PointError(Exception):
    """A point every rank gave up on together (no rank is left waiting in a collective)."""


def _agree(ok: bool) -> bool:
    """True when every rank is ok (gloo, on the TP group's CPU group)."""
    import torch
    import torch.distributed as dist
    from vllm.distributed import parallel_state as ps

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=ps.get_tp_group().cpu_group)
    return bool(flag.item())


def _slowest(values):
    """Element-wise maximum over the ranks of a list of floats."""
    import torch
    import torch.distributed as dist
    from vllm.distributed import parallel_state as ps

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ps.get_tp_group().cpu_group)
    return t.numpy()


def _issued_ops(fn) -> list[str]:
    """Non-metadata ops `fn` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dooly.trace.recorder import op_name
    from dooly.records import is_metadata_op

    seen: list[str] = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(op_name(func))
            return func(*args, **(kwargs or {}))

    with Log():
        fn()
    return [o for o in seen if not is_metadata_op(o)]


def _measure_point(text: str, point: dict, world_size: int) -> dict:
    import numpy as np
    import torch
    from vllm.distributed.communication_op import tensor_model_parallel_all_reduce

    from dooly.profile.replay import materialize
    from dooly.profile.timing import NOISY, TARGET_S

    start = time.perf_counter()
    why = None
    try:
        op = json.loads(text)["op"]
        if op not in _CALLS:
            raise ValueError(f"{op}: no collective call registered (known: {', '.join(sorted(_CALLS))})")
        args = materialize(text, point).args
        x, call = _CALLS[op](args, world_size)
        src = x.clone()
    except Exception as e:  # the same inputs on every rank: all fail alike, and agree on it below
        why = f"{type(e).__name__}: {_first_line(e)}"
    if not _agree(why is None):
        raise _PointError(why or "another rank could not build the inputs")
    issued = _issued_ops(call)
    if not _agree(issued == [op]):
        raise _PointError(f"the call for {op} issued {issued or 'nothing'} on some rank")
    align = torch.zeros(1, dtype=x.dtype)

    def run(n: int) -> np.ndarray:
        out = np.empty(n)
        for i in range(n):
            x.copy_(src)  # the producing op writes the activation (warm in cache, as in the model)
            tensor_model_parallel_all_reduce(align)  # every rank starts the call within ~1 us
            t0 = time.perf_counter_ns()
            call()
            out[i] = (time.perf_counter_ns() - t0) / 1e3
        return _slowest(out.tolist())

    warm = run(WARMUP)
    est_s = float(np.median(warm)) / 1e6
    n = int(min(MAX_REPEATS, max(MIN_REPEATS, TARGET_S / max(est_s, 1e-7))))
    times = run(n)
    p25, med, p75 = np.percentile(times, [25, 50, 75])
    if (p75 - p25) / med > NOISY:  # the same maxima on every rank: the same decision
        again = run(2 * n)
        q25, qmed, q75 = np.percentile(again, [25, 50, 75])
        if (q75 - q25) / qmed < (p75 - p25) / med:
            times, p25, med, p75 = again, q25, qmed, q75
    return {"median_us": float(med), "p25_us": float(p25), "p75_us": float(p75), "repeats": len(times),
            "cost_s": time.perf_counter() - start, "issued": issued}
