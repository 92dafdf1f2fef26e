"""Configuration search wall time: 1,000 configurations of the tiny Llama, with Ray and without (target: <= 60 s).

Profiles dooly/tiny-llama (reduced grid) into a temporary database, checks the grid's 1,000
configurations against vLLM's config rules once (cached on disk: the timed runs start warm, as any
second run does), then times `dooly.search.search` end to end in this process and on a local Ray
instance (start-up included), checks both give the same frames, and prints the five best.
Run: .venv/bin/python bench/search_speed.py [MODEL]
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

WORKLOAD = "n=100,prompt=uniform:32:512,output=uniform:16:128,seed=0"
SLO = "ttft_p99=500ms,tpot_p99=50ms"
SEQS = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 104, 112, 128]
BUDGETS = [128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1536, 2048, 2560, 3072, 4096, 6144, 8192]
GRID = [f"max_num_seqs={','.join(map(str, SEQS))}", f"max_num_batched_tokens={','.join(map(str, BUDGETS))}",
        "enable_prefix_caching=true,false"]  # 25 x 20 x 2 = 1,000


def _import_dooly() -> None:
    import dooly.predict  # noqa: F401 - what a search worker imports
    import dooly.search.sweep  # noqa: F401
    import dooly.trace  # noqa: F401


def _ray_startup() -> float:
    import logging

    import ray

    from dooly.cluster import usable_cores

    t0 = time.perf_counter()
    ray.init(num_cpus=usable_cores(), include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    task = ray.remote(num_cpus=1)(_import_dooly)
    ray.get([task.remote() for _ in range(usable_cores())])
    seconds = time.perf_counter() - t0
    ray.shutdown()
    return seconds


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "dooly/tiny-llama"
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"machine: {platform.node()} | {cpu} | {os.cpu_count()} cores | load {os.getloadavg()[0]:.1f} | "
          f"model {model}")
    import pandas as pd

    from dooly.search import search
    from dooly.search.grid import configurations, engine_check, parse_grid

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/latency.db"
        r = subprocess.run([sys.executable, "-m", "dooly.cli", "profile", model, "--grid", "reduced", "--db", url],
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"profile failed: {r.stderr.strip().splitlines()[-1]}")
        grid = parse_grid(GRID)
        configs = configurations([model], grid)
        t0 = time.perf_counter()
        rejected = engine_check(configs, grid)
        print(f"{len(configs)} configurations ({len(rejected)} rejected by vLLM); vLLM config checks "
              f"{time.perf_counter() - t0:.1f} s (cached on disk for later runs)")
        print(f"workload {WORKLOAD} | SLO {SLO}")
        print(f"Ray start-up alone (local instance, every worker importing dooly): {_ray_startup():.1f} s")
        results = {}
        for label, use_ray in (("without Ray", False), ("with Ray", True)):
            t0, c0 = time.perf_counter(), time.process_time()
            res = search(model, WORKLOAD, SLO, GRID, db=url, use_ray=use_ray)
            wall, cpu_s = time.perf_counter() - t0, time.process_time() - c0
            results[label] = res
            print(f"{label:12s}: wall {wall:6.1f} s ({res.ran_on}; this process's CPU {cpu_s:.1f} s) | "
                  f"{len(configs) / wall:6.1f} configurations/s | {res.simulated} simulations run for "
                  f"{len(res.rates)} rates tried")
        a, b = results["without Ray"], results["with Ray"]
        pd.testing.assert_frame_equal(a.configs, b.configs)
        pd.testing.assert_frame_equal(a.rates, b.rates)
        print("results with and without Ray: identical")
        cols = ["config", "status", "goodput_rps", "goodput_per_device_rps", "ttft_p99_s", "tpot_p99_s",
                "simulations"]
        with pd.option_context("display.width", 200, "display.max_colwidth", 90):
            print(a.configs[cols].head(5).to_string(index=False))


if __name__ == "__main__":
    main()
