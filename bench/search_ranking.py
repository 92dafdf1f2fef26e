"""Does `dooly search` rank engine settings as the real engine does? (issue #8)

One small model, several engine settings (default: max_num_seqs = 2, 4, 32), one workload and SLO.
1. `dooly search` (the CLI, --json, in-process) gives each setting's goodput: the highest Poisson
   rate whose simulation meets the SLO.
2. The real engine measures each setting's goodput: one engine per setting, and `dooly validate`
   serves the workload's requests at rates of a fixed ladder (ratio 1.25, the same for every
   setting, chosen before anything is measured), bisecting the ladder for the highest rate whose
   measured percentiles meet the SLO. Arrivals are the search's own (same seed, same unit Poisson
   pattern scaled to the rate), so engine and simulator serve the same requests at the same times.
Printed: per setting the predicted and measured goodput, every engine run (measured vs predicted
percentiles), and both rankings with whether they agree (Kendall's tau).
The database is profiled (reduced grid) and the overhead calibrated first when it lacks either.
Run: .venv/bin/python bench/search_ranking.py [--db URL] [--model M] [--setting max_num_seqs=2 ...]
     [--workload SPEC] [--slo SLO]; the KV-cache dtype ranking (issue #17):
     --model dooly/tiny-llama-kv-heavy --setting kv_cache_dtype=auto --setting kv_cache_dtype=fp8
     --workload n=48,prompt=uniform:384:640,output=uniform:32:96,seed=0 --slo ttft_p99=8s
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

from common import cpu_name, dooly, ready_database

os.environ.setdefault("OMP_NUM_THREADS", "1")

WORKLOAD = "n=100,prompt=uniform:32:512,output=uniform:16:128,seed=0"
SLO = "ttft_p99=500ms,tpot_p99=50ms"
SETTINGS = ("max_num_seqs=2", "max_num_seqs=4", "max_num_seqs=32")
ENGINE_KV_GIB = 1  # each real engine's KV space; the search simulates the same (it matters once KV is the limit)
LADDER = tuple(round(1.0 * 1.25 ** k, 3) for k in range(14))  # 1 .. 18.2 requests/s


def parse_setting(text: str) -> dict:
    name, _, value = text.partition("=")
    if value.isdigit():
        return {name: int(value)}
    if value.lower() in ("true", "false"):
        return {name: value.lower() == "true"}
    return {name: value}  # e.g. kv_cache_dtype=fp8


def requests_at(rate: float, lengths: tuple, seed: int):
    """The search's arrivals at `rate` (dooly.search.sweep.Job.unit_arrivals, scaled)."""
    from dooly.search.slo import parse_slo
    from dooly.search.sweep import Job, Sweep
    from dooly.sim.core import RequestSpec

    unit = Job("", lengths, parse_slo(SLO), Sweep(seed=seed)).unit_arrivals()
    return [RequestSpec(f"r{i}", float(t) / rate, p, o) for i, (t, (p, o)) in enumerate(zip(unit, lengths))]


def kendall_tau(a: list, b: list) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)


def main() -> None:
    global WORKLOAD, SLO
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default=None, help="a profiled, calibrated database (default: a fresh temporary one)")
    ap.add_argument("--model", default="dooly/tiny-llama")
    ap.add_argument("--setting", action="append", default=None, help="NAME=VALUE, repeatable (default: %s)"
                    % ", ".join(SETTINGS))
    ap.add_argument("--repeats", type=int, default=1, help="engine runs per rate (median of their percentiles)")
    ap.add_argument("--workload", default=WORKLOAD, help="request lengths (the arrivals are the search's)")
    ap.add_argument("--slo", default=SLO)
    a = ap.parse_args()
    WORKLOAD, SLO = a.workload, a.slo
    settings = a.setting or list(SETTINGS)
    cpu = cpu_name()
    print(f"machine: {platform.node()} | {cpu} | {os.cpu_count()} cores | load {os.getloadavg()[0]:.1f} | "
          f"model {a.model} | workload {WORKLOAD} | SLO {SLO}", flush=True)

    from dooly.api import parse_workload
    from dooly.catalog import resolve
    from dooly.engines.vllm.engine import start_engine, stop_engine
    from dooly.search.slo import parse_slo
    from dooly.validate import validate

    tmp = tempfile.mkdtemp(prefix="dooly-ranking-")
    url = a.db or f"sqlite:///{tmp}/latency.db"
    kv_dtypes = sorted({str(parse_setting(s).get("kv_cache_dtype", "auto")) for s in settings})
    print(f"database ready in {ready_database(url, a.model, kv_dtypes):.0f} s: {url}", flush=True)

    # 1. dooly search
    grid = {}
    for s in settings:
        for k, v in parse_setting(s).items():
            grid.setdefault(k, []).append(str(v).lower())
    grid.setdefault("kv_cache_gib", [str(ENGINE_KV_GIB)])  # the KV space the real engines below get
    grid_args = [x for k, vs in grid.items() for x in ("--grid", f"{k}={','.join(vs)}")]
    t0 = time.perf_counter()
    found = json.loads(dooly("search", a.model, "--workload", WORKLOAD, "--slo", SLO, *grid_args, "--db", url,
                             "--no-ray", "--json", ok=(0, 3)))
    search_s = time.perf_counter() - t0
    rows = found["configs"]
    predicted = {}
    for s in settings:
        (k, v), = parse_setting(s).items()
        row = next(r for r in rows if r[k] == v)
        predicted[s] = float(row["goodput_rps"] or 0.0)
    print(f"dooly search: {len(rows)} configurations in {search_s:.1f} s (CLI, start-up included)", flush=True)

    # 2. the real engine, through dooly validate, bisecting the ladder per setting
    spec = resolve(a.model)
    slo = parse_slo(SLO)
    lengths = tuple((r.prompt_tokens, r.output_tokens) for r in parse_workload(WORKLOAD))
    measured, runs = {}, []
    for s in settings:
        opts = parse_setting(s)
        llm = start_engine(spec.config, kv_cache_gib=ENGINE_KV_GIB, **opts)
        try:
            lo, hi = -1, len(LADDER)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                rate = LADDER[mid]
                t0 = time.perf_counter()
                wv, = validate(a.model, [requests_at(rate, lengths, 0)], db=url, repeats=a.repeats, llm=llm, **opts)
                m = wv.metrics.set_index(["metric", "stat"])
                ok, cells = True, []
                for t in slo.targets:
                    meas = float(m.loc[(f"{t.metric}_s", t.stat), "measured"])
                    pred = float(m.loc[(f"{t.metric}_s", t.stat), "predicted"])
                    ok &= not meas > t.seconds
                    cells.append(f"{t.name} {1e3 * meas:7.1f} ms (predicted {1e3 * pred:7.1f})")
                runs.append((s, rate, ok, cells, time.perf_counter() - t0))
                print(f"  {s:<28} rate {rate:6.2f}/s: {'meets' if ok else 'misses'} SLO | " + " | ".join(cells)
                      + f" | {time.perf_counter() - t0:.0f} s", flush=True)
                lo, hi = (mid, hi) if ok else (lo, mid)
            measured[s] = LADDER[lo] if lo >= 0 else 0.0
        finally:
            stop_engine(llm)

    print()
    print(f"{'setting':<28} {'search goodput':>15}   measured goodput (between ladder rungs)")
    for s in settings:
        i = LADDER.index(measured[s]) if measured[s] else -1
        upper = f"{LADDER[i + 1]:.2f}/s" if i + 1 < len(LADDER) else "beyond the ladder"
        lower = f"{measured[s]:.2f}/s" if i >= 0 else "below the ladder"
        inside = lower != "below the ladder" and measured[s] <= predicted[s] < (LADDER[i + 1] if i + 1 < len(LADDER)
                                                                                  else float("inf"))
        print(f"{s:<28} {predicted[s]:>13.2f}/s   >= {lower}, < {upper}"
              f"{' (search inside)' if inside else ''}")
    by_search = sorted(settings, key=lambda s: -predicted[s])
    by_engine = sorted(settings, key=lambda s: -measured[s])
    ties = len(set(measured.values())) < len(settings)
    print(f"ranking by dooly search:   {' > '.join(by_search)}")
    print(f"ranking by dooly validate: {' > '.join(by_engine)}" + (" (ties on the ladder)" if ties else ""))
    tau = kendall_tau([predicted[s] for s in settings], [measured[s] for s in settings])
    print(f"same order: {by_search == by_engine} | Kendall's tau {tau:.2f} | "
          f"{len(runs)} engine runs in {sum(r[4] for r in runs):.0f} s")


if __name__ == "__main__":
    main()
