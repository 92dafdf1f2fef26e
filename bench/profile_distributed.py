"""Distributed profiling: wall time and measurement agreement, one process vs Ray workers.

Profiles one model (default dooly/tiny-llama, --grid reduced) into two fresh SQLite databases:
first in this process (`dooly profile`), then split across the workers of a local Ray instance
(`dooly profile --ray-address local`: one worker per `threads` cores). Prints both wall times
(tracing and Ray start-up included, as a user sees them), the device-seconds each stored, and how
the two databases' medians agree point by point (ratio Ray / in-process: median and 10-90% range).
On one machine the workers share its memory bandwidth and caches, so the ratio shows what
concurrent measurement costs in accuracy here; on a cluster each worker has its own device.
Run: .venv/bin/python bench/profile_distributed.py [MODEL] [--grid reduced|full] [--ray-address ADDR]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def profile(model: str, url: str, grid: str, *extra: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "dooly.cli", "profile", model, "--grid", grid, "--db", url, *extra],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"dooly profile failed: {r.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="dooly/tiny-llama")
    ap.add_argument("--grid", default="reduced")
    ap.add_argument("--ray-address", default="local")
    a = ap.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"machine: {platform.node()} | {cpu} | {os.cpu_count()} cores | load {os.getloadavg()[0]:.1f} | "
          f"model {a.model} | grid {a.grid} | Ray {a.ray_address}", flush=True)
    import numpy as np

    from dooly.db import LatencyDB

    tmp = tempfile.mkdtemp(prefix="dooly-dist-")
    urls = {"in-process": f"sqlite:///{tmp}/one.db", "ray": f"sqlite:///{tmp}/ray.db"}
    wall = {"in-process": profile(a.model, urls["in-process"], a.grid)}
    wall["ray"] = profile(a.model, urls["ray"], a.grid, "--ray-address", a.ray_address)
    points = {}
    for name, url in urls.items():
        db = LatencyDB(url, create=False)
        (env,) = [s["env"] for s in db.stats()]
        points[name] = db.points(env)
        run = db.runs()[-1]
        print(f"{name:<11} wall {wall[name]:6.1f} s | {run['measured']} points, {run['device_s']:.1f} device-s "
              f"stored | status {run['status']}", flush=True)
    common = sorted(set(points["in-process"]) & set(points["ray"]))
    ratio = np.array([points["ray"][k].median_us / points["in-process"][k].median_us for k in common])
    lo, med, hi = np.percentile(ratio, [10, 50, 90])
    print(f"points in both: {len(common)} | Ray / in-process median latency: median {med:.3f}, "
          f"10-90% {lo:.3f}-{hi:.3f}")
    print(f"wall-time ratio in-process / Ray: {wall['in-process'] / wall['ray']:.2f}x")


if __name__ == "__main__":
    main()
