"""`dooly simulate` and the Python API on a profiled database."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

WORKLOAD = "n=24,prompt=uniform:20:300,output=uniform:4:24,arrivals=poisson:20,seed=3"
LIMITS = {"max_num_batched_tokens": 128, "max_num_seqs": 8}


def test_api_returns_dataframes_and_is_deterministic(profiled):
    from dooly.api import simulate

    db, _ = profiled
    a = simulate("dooly/tiny-llama", WORKLOAD, db=db.url, **LIMITS)
    b = simulate("dooly/tiny-llama", WORKLOAD, db=db.url, **LIMITS)
    assert a.requests.equals(b.requests) and a.steps.equals(b.steps)
    assert len(a.requests) == 24
    assert set(a.summary["metric"]) >= {"ttft_s", "tpot_s", "itl_s", "e2e_s", "requests_per_s"}
    assert (a.requests["ttft_s"] > 0).all() and (a.requests["e2e_s"] >= a.requests["ttft_s"]).all()
    assert a.steps["num_tokens"].max() <= 128 and a.steps["num_reqs"].max() <= 8  # the engine limits hold
    assert (a.steps["latency_s"] > 0).all()


def test_cli_json_and_outputs(profiled, tmp_path):
    db, _ = profiled
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "dooly.cli", "simulate", "dooly/tiny-llama", "--workload", WORKLOAD,
                        "--db", db.url, "--max-num-batched-tokens", "128", "--max-num-seqs", "8", "--json",
                        "--out", str(tmp_path), "--plot"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = {row["metric"]: row for row in json.loads(r.stdout)}
    assert summary["ttft_s"]["p99"] >= summary["ttft_s"]["p50"] > 0
    for name in ("requests.csv", "steps.csv", "summary.json", "latency_cdfs.png", "steps.png"):
        assert (tmp_path / name).stat().st_size > 0
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival_s,prompt_tokens,output_tokens\n0,100,20\n1,-5,3\n")
    r = subprocess.run([sys.executable, "-m", "dooly.cli", "simulate", "dooly/tiny-llama", "--workload", str(bad),
                        "--db", db.url], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode != 0 and "row 2: prompt tokens must be >= 1" in r.stderr and "Traceback" not in r.stderr


STAGES_FROM_CACHES = """
import sys, tempfile
from dooly.api import capacity, export_vidur, search, simulate
db, limits = sys.argv[1], {"max_num_seqs": 8, "max_num_batched_tokens": 128}
grid = ["max_num_seqs=4,8", "max_num_batched_tokens=128"]
res = simulate("dooly/tiny-llama", "n=10,prompt=64,output=8", db=db, **limits)
assert len(res.requests) == 10
assert len(search("dooly/tiny-llama", "n=10,prompt=64,output=8", "ttft_p99=1s", grid, db=db, use_ray=False).configs) == 2
capacity("dooly/tiny-llama", 1.0, "n=10,prompt=64,output=8", "ttft_p99=1s", grid, db=db, use_ray=False)
export_vidur("dooly/tiny-llama", tempfile.mkdtemp() + "/vidur", db=db, **limits)
print(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "vllm", "transformers", "sympy"}))
"""


def test_stages_from_cached_traces_and_settings_import_no_engine(profiled, tmp_path):
    """simulate, search, capacity and export from cached traces and settings import neither torch nor
    vLLM (nor transformers or sympy): the first run fills the caches, the second reads them."""
    db, _ = profiled
    env = {**os.environ, "DOOLY_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": "ignore"}
    runs = [subprocess.run([sys.executable, "-c", STAGES_FROM_CACHES, db.url], capture_output=True, text=True,
                           env=env, timeout=600) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(runs[0].stdout.strip().splitlines()[-1].replace("'", '"')) != []  # filling: traced
    assert runs[1].stdout.strip().splitlines()[-1] == "[]"


def test_time_scale_stretches_every_step(profiled):
    """A machine measured k times slower (drift-aware validation): every step takes k times longer,
    so with every request arriving at once every latency scales by k."""
    from dooly.api import Deployment, EngineOptions, simulate_deployment

    db, _ = profiled
    d = Deployment.resolve("dooly/tiny-llama", options=EngineOptions(**LIMITS))
    burst = "n=6,prompt=uniform:20:200,output=6,arrivals=burst,seed=2"
    one = simulate_deployment(d, burst, db=db.url).requests
    two = simulate_deployment(d, burst, db=db.url, time_scale=2.0).requests
    for column in ("ttft_s", "e2e_s"):
        assert (two[column] / one[column]).tolist() == pytest.approx([2.0] * len(one))
