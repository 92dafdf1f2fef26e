"""An FP8 KV cache beside its bf16 twin, on a workload where the KV cache is the limit (issue #17).

Model: dooly/tiny-llama-kv-heavy (8 layers, 32 KV heads of 128: 128 KB of bf16 KV per token), so the
real CPU engine's smallest KV space, 1 GiB, holds 64 blocks of 128 tokens in bf16 and 128 in fp8: a
burst of requests of ~600 tokens runs ~12 at a time in bf16 and ~25 in fp8. The same database serves
both (only the attention and KV-write ops differ; they are profiled for each KV dtype); the engine is
calibrated once (the calibration models, bf16).

Per KV dtype, `dooly validate` serves the workload `--repeats` times on a fresh engine. Printed: the
KV blocks the engine reports, per-request TTFT / TPOT MAPE with the noise floor and the machine's time
ratio, measured vs predicted mean TTFT / TPOT / E2E, the most requests in one step (measured vs
simulated) and preemptions; then the FP8/bf16 ratios of mean E2E and of output throughput, measured
vs predicted: the capacity gain has to show in both.
Run: .venv/bin/python bench/kv_cache_dtype.py [--db URL] [--repeats 3] [--workload SPEC]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile

from common import cpu_name, ready_database

os.environ.setdefault("OMP_NUM_THREADS", "1")

MODEL = "dooly/tiny-llama-kv-heavy"
WORKLOAD = "n=32,prompt=uniform:384:640,output=uniform:32:96,arrivals=burst,seed=7"
KV_DTYPES = ("auto", "fp8")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default=None, help="reuse a database (default: a fresh temporary one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workload", default=WORKLOAD)
    a = ap.parse_args()
    import pandas as pd

    from dooly.validate import validate

    pd.set_option("display.width", 250)
    cpu = cpu_name()
    print(f"machine: {platform.node()} | {cpu} | {os.cpu_count()} cores | OMP threads "
          f"{os.environ['OMP_NUM_THREADS']} | model {MODEL} | workload {a.workload} | repeats {a.repeats}", flush=True)
    tmp = tempfile.mkdtemp(prefix="dooly-kvdtype-")
    url = a.db or f"sqlite:///{tmp}/latency.db"
    print(f"database ready in {ready_database(url, MODEL, KV_DTYPES):.0f} s: {url}", flush=True)
    rows, e2e, thr = [], {}, {}
    for kv in KV_DTYPES:
        v, = validate(MODEL, [a.workload], db=url, repeats=a.repeats, kv_cache_dtype=kv,
                      progress=lambda msg: print(f"  .. {msg}", file=sys.stderr, flush=True))
        h, mt = v.headline(), v.metrics.set_index(["metric", "stat"])
        sim_steps = v.predicted.steps
        e2e[kv] = (mt.loc[("e2e_s", "mean"), "measured"], mt.loc[("e2e_s", "mean"), "predicted"])
        psum = v.predicted.summary.set_index("metric")
        measured_thr = [float(sum(r["output_tokens"] for _, r in reqs.iterrows())
                              / (steps["end_s"].max() - steps["start_s"].min())) for reqs, steps in v.measured]
        thr[kv] = (float(pd.Series(measured_thr).median()), float(psum.loc["output_tokens_per_s", "mean"]))
        rows.append({
            "kv_cache_dtype": kv,
            "KV blocks": v.num_blocks,
            "TTFT MAPE %": 100 * h["ttft_mape"], "TPOT MAPE %": 100 * h["tpot_mape"],
            "floor TTFT/TPOT %": f"{100 * h['spread_ttft']:.1f}/{100 * h['spread_tpot']:.1f}",
            "time ratio": h["time_ratio"],
            "mean TTFT s (meas/pred)": f"{mt.loc[('ttft_s', 'mean'), 'measured']:.2f}/"
                                       f"{mt.loc[('ttft_s', 'mean'), 'predicted']:.2f}",
            "mean TPOT ms (meas/pred)": f"{1e3 * mt.loc[('tpot_s', 'mean'), 'measured']:.1f}/"
                                        f"{1e3 * mt.loc[('tpot_s', 'mean'), 'predicted']:.1f}",
            "max reqs/step (meas/pred)": f"{max(int(s['num_reqs'].max()) for _, s in v.measured)}/"
                                         f"{int(sim_steps['num_reqs'].max())}",
            "preempted (meas/pred)": f"{max(int(s['preempted'].sum()) for _, s in v.measured)}/"
                                     f"{int(sim_steps['preempted'].sum())}",
        })
    print(f"\nFP8 KV cache vs bf16 on {cpu} (per-request MAPE over {a.repeats} engine runs; floor = run spread)")
    print(pd.DataFrame(rows).round(2).to_string(index=False))
    for name, d in (("mean E2E", e2e), ("output tokens/s", thr)):
        meas, pred = d["fp8"][0] / d["auto"][0], d["fp8"][1] / d["auto"][1]
        print(f"fp8 / bf16 {name}: measured {meas:.3f}, predicted {pred:.3f} "
              f"(error {100 * (pred - meas) / meas:+.1f}%)")
    faster_meas, faster_pred = e2e["fp8"][0] < e2e["auto"][0], e2e["fp8"][1] < e2e["auto"][1]
    print(f"ranking by mean E2E: engine says {'fp8' if faster_meas else 'bf16'} first, dooly says "
          f"{'fp8' if faster_pred else 'bf16'} first: {'same' if faster_meas == faster_pred else 'different'}")


if __name__ == "__main__":
    main()
