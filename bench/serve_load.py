"""`dooly serve` under load: N concurrent streaming requests (default 1,000) on loopback, all sent at
once, and how late the server sent their tokens against their predicted times (target: p99 <= 5 ms).

The server (`dooly serve`, one process) and the client (aiohttp, this process) each get one of the
machine's cores when it has two or more (taskset), so the client's parsing does not stall the
server. The run is bounded: N requests of fixed lengths, a deadline (--timeout), then both stop.
Lateness is the server's own measure (`/dooly/lag`: the time each token was handed to the connection
minus its predicted time). Run: .venv/bin/python bench/serve_load.py [--requests 1000] [--db URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, dooly  # noqa: E402

DOOLY = str(Path(sys.executable).parent / "dooly")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, url: str, port: int) -> subprocess.Popen:
    cmd = [DOOLY, "serve", args.model, "--db", url, "--port", str(port)]
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        cmd = ["taskset", "-c", "0", *cmd]
        os.sched_setaffinity(0, {1})
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    import urllib.request

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 180:
        if proc.poll() is not None:
            sys.exit(f"dooly serve exited: {proc.stderr.read().strip().splitlines()[-1:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=1) as r:
                if r.status == 200:
                    print(f"server up in {time.perf_counter() - t0:.1f} s")
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("dooly serve did not start in 180 s")


async def one(session, base: str, i: int, args, out: dict) -> None:
    payload = {"model": args.model, "prompt": [1 + (i * 7 + j) % 1000 for j in range(args.prompt)],
               "max_tokens": args.output, "stream": True}
    t0 = time.perf_counter()
    tokens, ttft = 0, None
    async with session.post(f"{base}/v1/completions", json=payload) as r:
        if r.status != 200:
            out["errors"] += 1
            return
        async for line in r.content:
            if line.startswith(b"data: {"):
                tokens += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    out["tokens"] += tokens
    out["ttft"].append(ttft)
    out["done"] += 1


async def load(base: str, args) -> dict:
    import aiohttp

    out = {"tokens": 0, "done": 0, "errors": 0, "ttft": []}
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(session, base, i, args, out) for i in range(args.requests)),
                                       return_exceptions=True)
        out["wall_s"] = time.perf_counter() - t0
        out["exceptions"] = sum(isinstance(r, BaseException) for r in results)
        async with session.get(f"{base}/dooly/lag") as r:
            out["lag"] = await r.json()
        async with session.get(f"{base}/metrics") as r:
            out["metrics"] = await r.text()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dooly/tiny-llama")
    ap.add_argument("--db", help="a profiled database (default: the model profiled, reduced grid, into a temp one)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens of each request")
    ap.add_argument("--output", type=int, default=64, help="output tokens of each request")
    ap.add_argument("--timeout", type=float, default=600, help="seconds before the client gives up")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    print(f"machine: {cpu_name()} | {os.cpu_count()} cores | model {args.model} | {args.requests} streams of "
          f"{args.prompt} in / {args.output} out, all at once")
    tmp = tempfile.mkdtemp(prefix="dooly-bench-")
    try:
        url = args.db or f"sqlite:///{tmp}/latency.db"
        if not args.db:
            dooly("profile", args.model, "--grid", "reduced", "--db", url)
        port = free_port()
        proc = start_server(args, url, port)
        try:
            res = asyncio.run(load(f"http://127.0.0.1:{port}", args))
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lag = res["lag"]
    ttft = sorted(t for t in res["ttft"] if t is not None)
    running = max((float(x.rsplit(" ", 1)[1]) for x in res["metrics"].splitlines()
                   if x.startswith("vllm:num_requests_running{")), default=0)
    print(f"completed {res['done']}/{args.requests} streams ({res['errors']} HTTP errors, {res['exceptions']} "
          f"client exceptions) in {res['wall_s']:.1f} s; {res['tokens']} tokens "
          f"({res['tokens'] / res['wall_s']:.0f} tokens/s), {lag['steps']} engine steps")
    if ttft:
        print(f"client TTFT: median {statistics.median(ttft):.2f} s, max {ttft[-1]:.2f} s")
    print(f"token lateness (server, {lag['tokens']} tokens): p50 {1e3 * lag['p50_s']:.2f} ms | "
          f"p99 {1e3 * lag['p99_s']:.2f} ms | max {1e3 * lag['max_s']:.2f} ms | target p99 <= 5 ms: "
          f"{'met' if lag['p99_s'] <= 0.005 else 'MISSED'}  (running gauge at the end: {running:.0f})")
    if args.out:
        Path(args.out).write_text(json.dumps({k: v for k, v in res.items() if k != "metrics"}, indent=1))


if __name__ == "__main__":
    main()
