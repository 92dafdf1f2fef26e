"""Trace time and peak RSS for every catalog model (target: <=5 s and <=1 GB each).

`--dispatch amx` traces every model as vLLM dispatches on a CPU with AMX tiles (SGL GEMMs for
weights <= 1 MiB, AMX attention and MoE), whatever this CPU has; the `sgl` column counts SGL GEMMs.

Each model is traced in a fresh process (so peak RSS is that model's alone) with 1 torch thread.
Trace time is the tracer's own wall time (real-config run + 2 perturbed runs + labelling), warm:
the model's second trace in its process. The first ("cold") trace also pays one-time lazy set-up
(vLLM model/attention modules, fake-tensor caches) and is printed beside it; imports apart.
Run: .venv/bin/python bench/trace_catalog.py [vllm|hf] [--dispatch here|amx] [MODEL ...]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import torch; torch.set_num_threads(1)
from dooly.catalog import resolve
from dooly.trace import trace_model
import contextlib, dooly.engines.vllm.tracer, vllm.model_executor.model_loader.utils  # imports, timed apart
from dooly.engines.vllm.kernels import amx_dispatch
t1 = time.perf_counter()
with amx_dispatch() if sys.argv[3] == "amx" else contextlib.nullcontext():
    cold = trace_model(resolve(sys.argv[1]), engine=sys.argv[2])  # first trace: one-time lazy set-up inside
    t = trace_model(resolve(sys.argv[1]), engine=sys.argv[2])  # what every further model in a process costs
print(json.dumps({"import_s": t1 - t0, "cold_s": cold.seconds, "trace_s": t.seconds, "ops": len(t.ops), "sigs": len(t.signatures()),
                  "unresolved": t.unresolved, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "sgl": sum(o.op == "_C::weight_packed_linear" for o in t.ops)}))
"""


def main() -> None:
    from dooly.catalog import catalog_ids

    args = sys.argv[1:]
    dispatch = "here"
    if "--dispatch" in args:
        i = args.index("--dispatch")
        dispatch = args[i + 1]
        del args[i:i + 2]
    if dispatch not in ("here", "amx"):
        sys.exit(f"--dispatch must be here or amx, got {dispatch!r}")
    engine = args[0] if args else "vllm"
    models = args[1:] or catalog_ids()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"machine: {platform.node()} | {cpu} | {os.cpu_count()} cores | engine {engine} | dispatch {dispatch}")
    print(f"{'model':44s} {'trace s':>8s} {'cold s':>7s} {'RSS MB':>8s} {'ops':>6s} {'sigs':>5s} {'unres':>5s} "
          f"{'sgl':>4s} {'import s':>8s}")
    rows = []
    for name in models:
        r = subprocess.run([sys.executable, "-c", CHILD, name, engine, dispatch], capture_output=True, text=True,
                           env=env)
        if r.returncode:
            print(f"{name:44s} FAILED: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
            continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append(d)
        flag = "" if d["trace_s"] <= 5 and d["rss_mb"] <= 1024 else "  <-- over target"
        print(f"{name:44s} {d['trace_s']:8.2f} {d['cold_s']:7.2f} {d['rss_mb']:8.0f} {d['ops']:6d} {d['sigs']:5d} "
              f"{d['unresolved']:5d} {d['sgl']:4d} {d['import_s']:8.1f}{flag}")
    ts = [d["trace_s"] for d in rows]
    rss = [d["rss_mb"] for d in rows]
    cs = [d["cold_s"] for d in rows]
    print(f"cold trace s: median {statistics.median(cs):.2f}, max {max(cs):.2f}")
    print(f"trace s: median {statistics.median(ts):.2f}, min {min(ts):.2f}, max {max(ts):.2f}; "
          f"peak RSS MB: median {statistics.median(rss):.0f}, max {max(rss):.0f}; "
          f"models over 5 s: {sum(t > 5 for t in ts)}, over 1 GB: {sum(r > 1024 for r in rss)}, "
          f"unresolved dims total: {sum(d['unresolved'] for d in rows)}")


if __name__ == "__main__":
    main()
