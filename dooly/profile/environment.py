"""The environment key of measurements taken on this machine."""

from __future__ import annotations

import os
import platform

from dooly.db.records import Environment

# Bump when the timing method changes: old points then no longer match.
TIMING_METHOD = "cpu-rotate-llc4x-v1"
_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
              "asimd", "sve")


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


def default_threads() -> int:
    """Threads vLLM's CPU worker computes with here: it binds one core less than the machine has
    (one is left to the engine's front end), at least one."""
    return max(1, (os.cpu_count() or 2) - 1)


def current_environment(engine: str, engine_version: str, dtype: str, threads: int) -> Environment:
    import torch

    name, isa = _cpu_info()
    return Environment(device="cpu", device_name=name, isa=isa, engine=engine, engine_version=engine_version,
                       torch_version=torch.__version__, dtype=dtype, threads=threads,
                       binding=f"omp-{threads}-threads", timing=TIMING_METHOD)
