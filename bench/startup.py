"""Start-up of the commands that only read caches: simulate, search, capacity and export from cached
traces and scheduler settings import neither torch nor vLLM. Target: `dooly simulate` of 10 requests
in <= 1.5 s wall (interpreter start included).

Each command runs as a fresh process `--repeats` times after one warm-up run (which fills the trace,
settings and dispatch caches under a private DOOLY_CACHE); the script prints the median and the
min-max spread of the wall times, and which heavy modules a fresh in-process run of each stage
imported. Thread counts are pinned (OMP_NUM_THREADS=1).

Run: .venv/bin/python bench/startup.py [--repeats 5] [--db URL]
     (without --db, dooly/tiny-llama is first profiled into a temporary SQLite database, ~30 s)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "dooly/tiny-llama"
LIMITS = ["--max-num-seqs", "8", "--max-num-batched-tokens", "128"]
HEAVY = ("torch", "vllm", "transformers", "sympy", "scipy", "sklearn")

IN_PROCESS = """
import sys, tempfile
from dooly.api import capacity, export_vidur, search, simulate
db, stage, limits = sys.argv[1], sys.argv[2], {"max_num_seqs": 8, "max_num_batched_tokens": 128}
grid = ["max_num_seqs=4,8", "max_num_batched_tokens=128"]
if stage == "simulate":
    simulate("dooly/tiny-llama", "n=10,prompt=64,output=8", db=db, **limits)
elif stage == "search":
    search("dooly/tiny-llama", "n=10,prompt=64,output=8", "ttft_p99=1s", grid, db=db, use_ray=False)
elif stage == "capacity":
    capacity("dooly/tiny-llama", 1.0, "n=10,prompt=64,output=8", "ttft_p99=1s", grid, db=db, use_ray=False)
else:
    export_vidur("dooly/tiny-llama", tempfile.mkdtemp() + "/vidur", db=db, **limits)
print(sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[3].split(","))))
"""


def commands(dooly: str, db: str, out: Path) -> dict[str, list[str]]:
    return {
        "import dooly.api": [sys.executable, "-c", "import dooly.api"],
        "simulate 10 requests": [dooly, "simulate", MODEL, "--workload", "n=10,prompt=64,output=8", "--db", db,
                                 *LIMITS, "--json"],
        "simulate 10,000 requests": [dooly, "simulate", MODEL, "--workload",
                                     "n=10000,prompt=uniform:16:256,output=uniform:4:64,arrivals=poisson:50,seed=1",
                                     "--db", db, *LIMITS, "--json"],
        "search 2 configs (--no-ray)": [dooly, "search", MODEL, "--workload", "n=50,prompt=64,output=8", "--slo",
                                        "ttft_p99=1s", "--grid", "max_num_seqs=4,8", "--grid",
                                        "max_num_batched_tokens=128", "--db", db, "--no-ray", "--json"],
        "export vidur": [dooly, "export", "vidur", MODEL, "--out", str(out), "--db", db, *LIMITS],
    }


def run(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    took = time.perf_counter() - start
    if r.returncode not in (0, 3):  # 3: search found no configuration meeting the SLO (still a full run)
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{r.stderr[-2000:]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--db", help="a database holding dooly/tiny-llama (limits 128 tokens / 8 requests)")
    ap.add_argument("--max-s", type=float, default=1.5, help="target for `simulate 10 requests` (median)")
    a = ap.parse_args()
    dooly = str(Path(sys.executable).with_name("dooly"))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"machine: {platform.node()} | {cpu} | {os.cpu_count()} cores | python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="dooly-startup-") as tmp:
        env = {**os.environ, "DOOLY_CACHE": f"{tmp}/cache", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        db = a.db or f"sqlite:///{tmp}/latency.db"
        if not a.db:
            print("profiling dooly/tiny-llama into a temporary database (reduced grid) ...", flush=True)
            run([dooly, "profile", MODEL, "--grid", "reduced", *LIMITS, "--db", db], env)
        times: dict[str, list[float]] = {}
        for k in range(a.repeats + 1):  # run 0 fills the caches and is not counted
            for name, cmd in commands(dooly, db, Path(tmp) / f"vidur{k}").items():
                took = run(cmd, env)
                if k:
                    times.setdefault(name, []).append(took)
        print(f"\nwall seconds per fresh process, {a.repeats} runs after a warm-up (median, min-max):")
        for name, ts in times.items():
            print(f"  {name:30s} {statistics.median(ts):6.2f}  ({min(ts):.2f}-{max(ts):.2f})")
        print("\nheavy modules a fresh process imported (caches warm):")
        for stage in ("simulate", "search", "capacity", "export"):
            r = subprocess.run([sys.executable, "-c", IN_PROCESS, db, stage, ",".join(HEAVY)], capture_output=True,
                               text=True, env=env, timeout=900)
            print(f"  {stage:10s} {r.stdout.strip().splitlines()[-1] if r.returncode == 0 else 'FAILED'}")
        median = statistics.median(times["simulate 10 requests"])
        verdict = "meets" if median <= a.max_s else "MISSES"
        print(f"\nsimulate 10 requests: median {median:.2f} s {verdict} the {a.max_s} s target")
        print(json.dumps({name: statistics.median(ts) for name, ts in times.items()}))


if __name__ == "__main__":
    main()
