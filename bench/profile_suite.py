"""Device-seconds with reuse vs without, profiling a suite of real 7-8B-class catalog models.

Profiles the suite (default `paper12`: Llama-2/3/3.1, Vicuna, Mistral, BioMistral, Qwen2.5,
DeepSeek-R1-Distill-Qwen; base models and their fine-tunes) into a fresh SQLite database with the
reduced grid (num_tokens 1, 16, 128, 512, 2048; num_reqs 1, 8, 64), stateless operations, at the
real model dimensions (weights are random; every GEMM runs at full 7-8B size on this CPU).
"Without reuse" is a per-model profiler on the same grid and timing method: every model measures
every one of its signatures' points from scratch; its cost is the sum of the measured cost of each
point over each model that needs it.   Run: .venv/bin/python bench/profile_suite.py [SUITE] [GRID]
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter


def main() -> None:
    suite = sys.argv[1] if len(sys.argv) > 1 else "paper12"
    grid = sys.argv[2] if len(sys.argv) > 2 else "reduced"
    from dooly.catalog import suite as suite_models
    from dooly.db import LatencyDB

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"machine: {platform.node()} | {cpu} | {os.cpu_count()} cores | suite {suite} | grid {grid}")
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/suite.db"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "dooly.cli", "profile", "--suite", suite, "--grid", grid,
                            "--db", url], capture_output=True, text=True, env=env)
        wall = time.time() - t0
        if r.returncode:
            sys.exit(f"profile failed: {r.stderr.strip().splitlines()[-1]}")
        print(r.stdout)
        db = LatencyDB(url, create=False)
        run = db.runs()[-1]
        points = db.points(run["env"])
        # per model: the signatures it needs, how many an earlier model already brought
        from dooly.catalog import resolve
        from dooly.profile import Limits, plan_profile
        from dooly.profile.environment import current_environment
        from dooly.trace import trace_model

        names = suite_models(suite)
        seen: set = set()
        env_rec = db.environments()[0]
        print(f"{'model':44s} {'sigs':>5s} {'new':>4s} {'points':>6s} {'from-scratch s':>14s}")
        for name in names:
            t = trace_model(resolve(name))
            plan = plan_profile([t], env_rec, points, grid, Limits())
            need = plan.needs[name]
            sigs = {s for s, _ in need}
            cost = sum(points[k].cost_s for k in need if k in points)
            print(f"{name:44s} {len(sigs):5d} {len(sigs - seen):4d} {len(need):6d} {cost:14.1f}")
            seen |= sigs
        saved = 100 * (1 - run["device_s"] / run["baseline_s"])
        print(f"device-seconds with reuse: {run['device_s']:.1f} | without reuse: {run['baseline_s']:.1f} | "
              f"saved: {saved:.1f}% | points measured: {run['measured']} | wall incl. tracing: {wall:.0f} s")


if __name__ == "__main__":
    main()
