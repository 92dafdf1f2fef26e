"""The environment key of measurements taken on this machine."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from dooly.db.records import Environment

# Bump when the timing method changes: old points then no longer match.
TIMING_METHOD = "cpu-rotate-llc4x-evict-l2-v2"
_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
              "asimd", "sve")
# The communicator a tensor-parallel group's collectives run over, per device: vLLM's CPU worker
# all-reduces through shared memory (`CpuCommunicator` with `_CPUSHMDistributed`).
COMMUNICATORS = {"cpu": "cpu-shm"}


def _cpu_info() -> tuple[str, str]:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return name, ",".join(f for f in _ISA_FLAGS if f in flags)


def last_level_cache_bytes() -> int:
    """This machine's largest cache (sysfs), bytes; 32 MiB when sysfs does not say."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        best = max(best, int(text.rstrip("KMG")) * scale)
    return best or 32 << 20


LLC = last_level_cache_bytes()


def default_threads(tensor_parallel_size: int = 1) -> int:
    """Threads vLLM's CPU worker computes with here: alone, it binds one core less than the machine
    has (one is left to the engine's front end), at least one; as one of `tp` tensor-parallel ranks,
    an equal share of the cores (the split VLLM_CPU_OMP_THREADS_BIND="0|1" makes on 2 cores)."""
    cores = os.cpu_count() or 2
    return max(1, cores - 1) if tensor_parallel_size == 1 else max(1, cores // tensor_parallel_size)


def current_environment(engine: str, engine_version: str, dtype: str, threads: int,
                        tensor_parallel_size: int = 1) -> Environment:
    """The key of measurements taken here now. `threads` are per rank; at tensor_parallel_size > 1 the
    environment also names the communicator the group's collectives run over."""
    from importlib.metadata import version  # torch's version without importing torch

    name, isa = _cpu_info()
    return Environment(
        device="cpu",
        device_name=name,
        isa=isa,
        engine=engine,
        engine_version=engine_version,
        torch_version=version("torch"),
        dtype=dtype,
        threads=threads,
        binding=f"omp-{threads}-threads",
        timing=TIMING_METHOD,
        tensor_parallel_size=tensor_parallel_size,
        communicator=COMMUNICATORS["cpu"] if tensor_parallel_size > 1 else "",
    )
