"""Helpers the benchmark scripts share: the CPU's name, the dooly CLI in a subprocess, a ready database."""

from __future__ import annotations

import subprocess
import sys
import time


def cpu_name() -> str:
    """The CPU model, printed beside every figure (the machine under a session changes)."""
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")


def dooly(*args: str, ok: tuple[int, ...] = (0,)) -> str:
    """Run `dooly ARGS` (this interpreter); exit with its last stderr line unless its code is in `ok`."""
    r = subprocess.run([sys.executable, "-m", "dooly.cli", *args], capture_output=True, text=True)
    if r.returncode not in ok:
        sys.exit(f"dooly {' '.join(args)} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return r.stdout


def ready_database(url: str, model: str, kv_cache_dtypes=("auto",)) -> float:
    """Profile `model` (reduced grid, each KV dtype: only what is missing) and calibrate the engine when
    the database is not (its calibration models profiled first). Returns the seconds it took."""
    from dooly.api import calibrated
    from dooly.predict.calibrate import CALIBRATION_MODELS

    t0 = time.perf_counter()
    for kv in kv_cache_dtypes:
        dooly("profile", model, "--grid", "reduced", "--kv-cache-dtype", kv, "--db", url)
    if not calibrated(url):
        for m in CALIBRATION_MODELS:
            dooly("profile", m, "--grid", "reduced", "--db", url)
        dooly("calibrate", "--db", url)
    return time.perf_counter() - t0
