"""Simulator wall time, start-up included, for 2,000 and 10,000 requests (target: 10k in <= 10 s).

Profiles the tiny Llama (reduced grid) into a temporary database, then times `dooly.api.simulate`
end to end (trace, predictor fits, vLLM's scheduler in virtual time, step predictions) on Poisson
arrivals with mixed prompt/output lengths. Run: .venv/bin/python bench/sim_speed.py [MODEL]
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "dooly/tiny-llama"
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"machine: {platform.node()} | {cpu} | {os.cpu_count()} cores | model {model}")
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/latency.db"
        r = subprocess.run([sys.executable, "-m", "dooly.cli", "profile", model, "--grid", "reduced", "--db", url],
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"profile failed: {r.stderr.strip().splitlines()[-1]}")
        from dooly.api import simulate

        for n in (2000, 10000):
            workload = f"n={n},prompt=uniform:32:1024,output=uniform:8:256,arrivals=poisson:20,seed=0"
            t0 = time.perf_counter()
            res = simulate(model, workload, db=url)
            wall = time.perf_counter() - t0
            steps = len(res.steps)
            print(f"{n:6d} requests: wall {wall:7.1f} s (start-up included) | {steps} steps | "
                  f"{steps / wall:8.0f} steps/s | {n / wall:7.0f} requests/s | simulated makespan "
                  f"{res.requests['finish_s'].max():.1f} s")


if __name__ == "__main__":
    main()
