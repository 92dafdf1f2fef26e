"""Accuracy of dooly against the real engine: `dooly validate` over models x workloads, one table.

Models (different architectures, small enough for this CPU): dense Llama, Qwen2 (qkv bias), Mistral
with a sliding window, Mixtral-style MoE, and two real-size configs (Qwen2.5-0.5B, Llama-3.2-1B).
Workloads: one request; 8 concurrent requests; Poisson arrivals with mixed prompt/output lengths at a
rate that queues; the first 60 requests of the Azure LLM inference trace 2023 (conversation), as they
arrived, token counts divided by --azure-scale (bench/data/README.md). Rows of the calibration models
are marked: they do not claim transfer. Every model (and the calibration models) is profiled (reduced
grid) into one fresh database, the engine is calibrated once (`dooly calibrate`, on dooly/tiny-llama
and dooly/tiny-llama-deep: the in-engine ratio of every op family and the per-step overhead; every
other model is out of sample), then each model's engine is started once and every workload is served
`--repeats` times after a warm-up. Printed per model x workload: per-request TTFT and TPOT MAPE, P99
TTFT error, step-latency MAPE (each measured step vs the prediction for the batch the engine ran),
batch composition match, the run-to-run spread of mean TTFT / TPOT (the noise floor), the machine's
time ratio (sentinels re-timed around every run) and the speed-corrected MAPE, and which metrics are
inconclusive (noise floor above the 5% target: not counted for the 5% target); then the per-step
residuals by step type, with the predicted split; then where the error sits: one more run per
workload with every op timed in the engine, per step type and op family in-engine vs predicted.
TP=2 rows: `--tp-models` are also profiled at TP=2 (rank ops + collectives measured with vLLM's
shared-memory communicator between 2 real processes), the TP=2 overhead is calibrated, and the
real engine runs 2 workers (one per core) on the concurrent and Poisson workloads; printed with
the predicted vs measured TP=2/TP=1 speed-up (ratio of mean E2E latency).
Run: .venv/bin/python bench/accuracy.py [--models a,b] [--tp-models a,b] [--workloads a,b] [--repeats 3]
     [--azure-scale 8] [--db URL] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

from common import cpu_name, dooly

os.environ.setdefault("OMP_NUM_THREADS", "1")

MODELS = ("dooly/tiny-llama", "dooly/tiny-qwen2", "dooly/tiny-mistral-sw", "dooly/tiny-mixtral",
          "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B")  # tiny ones, then real-size configs
AZURE_SLICE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "azure_llm_conv_2023_first60.csv")
TP_MODELS = ("dooly/tiny-llama", "dooly/tiny-mistral-sw")  # tiny-qwen2 has 7 heads: no TP=2
TP_WORKLOADS = ("8-concurrent", "poisson-queued")
WORKLOADS = {
    "single": "n=1,prompt=512,output=64,arrivals=burst,seed=0",
    "8-concurrent": "n=8,prompt=uniform:64:512,output=64,arrivals=burst,seed=1",
    "poisson-queued": "n=40,prompt=uniform:32:768,output=uniform:16:96,arrivals=poisson:8,seed=2",
    "azure-conv": None,  # the Azure 2023 conversation trace's first 60 requests, down-scaled (azure_workload)
}


def azure_workload(folder: str, scale: int) -> str:
    """A CSV of the Azure slice (bench/data/README.md) served as it arrived, with token counts divided by
    `scale` (at least 1): the production trace's shape at what a 2-core CPU serves."""
    import csv
    from datetime import datetime

    with open(AZURE_SLICE) as f:
        rows = list(csv.DictReader(f))
    t0 = datetime.fromisoformat(rows[0]["TIMESTAMP"][:26])
    path = os.path.join(folder, f"azure-conv-div{scale}.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arrival_s", "prompt_tokens", "output_tokens"])
        for r in rows:
            arrival = (datetime.fromisoformat(r["TIMESTAMP"][:26]) - t0).total_seconds()
            w.writerow([f"{arrival:.6f}", max(1, int(r["ContextTokens"]) // scale),
                        max(1, int(r["GeneratedTokens"]) // scale)])
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tp-models", default=",".join(TP_MODELS), help="models also validated at TP=2 ('' for none)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--db", default=None, help="reuse a profiled database (default: a fresh temporary one)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"of {', '.join(WORKLOADS)}")
    ap.add_argument("--azure-scale", type=int, default=8, help="divide the Azure slice's token counts by this")
    a = ap.parse_args()
    import pandas as pd

    from dooly.predict.calibrate import CALIBRATION_MODELS  # rows of these do not claim transfer
    from dooly.validate import validate

    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 30)
    cpu = cpu_name()
    print(f"machine: {platform.node()} | {cpu} | {os.cpu_count()} cores | OMP threads "
          f"{os.environ['OMP_NUM_THREADS']} | repeats {a.repeats}")
    models = [m for m in a.models.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        url = a.db or f"sqlite:///{tmp}/latency.db"
        WORKLOADS["azure-conv"] = azure_workload(tmp, a.azure_scale)
        chosen = [n for n in a.workloads.split(",") if n]
        unknown = sorted(set(chosen) - set(WORKLOADS))
        if unknown:
            sys.exit(f"unknown workloads {unknown}; workloads: {', '.join(WORKLOADS)}")
        t0 = time.perf_counter()
        tp_models = [m for m in a.tp_models.split(",") if m]
        for m in dict.fromkeys(list(CALIBRATION_MODELS) + models):  # calibration needs its models profiled
            dooly("profile", m, "--grid", "reduced", "--db", url)
        dooly("calibrate", "--db", url)
        for m in dict.fromkeys(list(CALIBRATION_MODELS) + tp_models) if tp_models else ():
            dooly("profile", m, "--grid", "reduced", "--tp", "2", "--db", url)
        if tp_models:
            dooly("calibrate", "--db", url, "--tensor-parallel-size", "2")
        print(f"profiled {len(models)} models (+{len(tp_models)} at TP=2) and calibrated the overhead in "
              f"{time.perf_counter() - t0:.0f} s")
        rows, residuals, splits, e2e = [], [], [], {}
        runs = [(m, 1, chosen) for m in models] + [(m, 2, [n for n in TP_WORKLOADS if n in chosen]) for m in tp_models]
        for m, tensor_parallel_size, names in runs:
            results = validate(
                m,
                [WORKLOADS[n] for n in names],
                db=url,
                repeats=a.repeats,
                tensor_parallel_size=tensor_parallel_size,
                split_ops=tensor_parallel_size == 1,
                progress=lambda msg: print(f"  .. {msg}", file=sys.stderr),
            )
            for name, v in zip(names, results):
                h = v.headline()
                mt = v.metrics.set_index(["metric", "stat"])
                e2e[(m, name, tensor_parallel_size)] = (
                    mt.loc[("e2e_s", "mean"), "measured"],
                    mt.loc[("e2e_s", "mean"), "predicted"],
                )
                rows.append(
                    {
                        "model": m + (" (calibration)" if m in CALIBRATION_MODELS else ""),
                        "tp": tensor_parallel_size,
                        "workload": name,
                        "TTFT MAPE %": 100 * h["ttft_mape"],
                        "TPOT MAPE %": 100 * h["tpot_mape"],
                        "P99 TTFT err %": 100 * h["p99_ttft_err"],
                        "step MAPE %": 100 * h["step_mape"],
                        "batch match %": 100 * h["match_rate"],
                        "spread TTFT %": 100 * h["spread_ttft"],
                        "spread TPOT %": 100 * h["spread_tpot"],
                        "time ratio": h["time_ratio"],
                        "TTFT MAPE corr %": 100 * h["ttft_mape_corrected"],
                        "TPOT MAPE corr %": 100 * h["tpot_mape_corrected"],
                        "inconclusive": ",".join(k.upper() for k in ("ttft", "tpot") if h[f"inconclusive_{k}"]),
                    }
                )
                for _, r in v.step_types.iterrows():
                    residuals.append({"model": m, "tp": tensor_parallel_size, "workload": name, **r.to_dict()})
                for _, r in v.op_split.iterrows():
                    splits.append({"model": m, "workload": name, **r.to_dict()})
                if a.out:
                    from dooly.validate import write_validation

                    write_validation([v], os.path.join(a.out, m.replace("/", "__"), f"tp{tensor_parallel_size}-{name}"))
    table = pd.DataFrame(rows)
    print(f"\naccuracy vs the real engine on {cpu} (per-request MAPE; spread = (max - min) / median over runs "
          "= the noise floor; time ratio = the machine's time now / when profiled, from sentinel points; "
          "corr = with the simulation's steps scaled by it; inconclusive = noise floor above 5%)")
    print(table.round(2).to_string(index=False))
    worst = table[["TTFT MAPE %", "TPOT MAPE %"]].max()
    print(f"\nworst TTFT MAPE {worst['TTFT MAPE %']:.1f}% | worst TPOT MAPE {worst['TPOT MAPE %']:.1f}% "
          f"| target <= 10% in every cell: {'met' if worst.max() <= 10 else 'missed'}")
    for metric in ("TTFT", "TPOT"):
        firm = table[~table["inconclusive"].str.contains(metric)]
        for col in (f"{metric} MAPE %", f"{metric} MAPE corr %"):
            top = firm[col].max() if len(firm) else float("nan")
            print(f"{col:18s} over the {len(firm)} cells with a noise floor below 5%: worst {top:.1f}% | "
                  f"target <= 5%: {'met' if top <= 5 else 'missed'}")
    print("\nper-step residuals by step type (signed error = (predicted - measured) / measured; "
          "predicted split in ms)")
    res = pd.DataFrame(residuals)
    cols = [c for c in ("model", "tp", "workload", "type", "steps", "measured_ms", "predicted_ms", "mape",
                        "mean_signed_err", "stateless_ms", "stateful_ms", "collective_ms", "overhead_ms") if c in res]
    print(res[cols].round(3).to_string(index=False))
    if splits:
        print("\nwhere the error sits: per step type and op family, mean ms per step in the engine (one extra run "
              "with every op timed) vs predicted for the same batches; 'overhead' = measured step - its ops in the "
              "engine, vs the predicted per-step overhead")
        sp = pd.DataFrame(splits)
        sp["signed_err %"] = 100 * sp.pop("signed_err")
        print(sp.round(3).to_string(index=False))
    speed = [{"model": m, "workload": n, "measured TP2/TP1 speed-up": e2e[(m, n, 1)][0] / e2e[(m, n, 2)][0],
              "predicted TP2/TP1 speed-up": e2e[(m, n, 1)][1] / e2e[(m, n, 2)][1]}
             for (m, n, tensor_parallel_size) in e2e if tensor_parallel_size == 2 and (m, n, 1) in e2e]
    if speed:
        print("\nTP=2 speed-up over TP=1 (mean E2E latency ratio, > 1 = TP=2 faster)")
        print(pd.DataFrame(speed).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
