"""Goodput of one configuration: the highest Poisson request rate whose simulation meets the SLO.

The rates tried lie on one geometric grid, rate_k = rate_min x (1 + tolerance)^k up to rate_max, and
every simulation at rate r serves the workload's request lengths with arrivals u_i / r, where u are
the cumulative sums of seeded unit exponential gaps (the first is 0): the same arrival pattern
stretched, so rates are compared on common random numbers. The search, a function of the
configuration alone (so the same wherever it runs):

1. start at the grid rate nearest a throughput estimate (two step predictions: a full decode batch
   and a prefill chunk);
2. gallop (steps of 4, 8, 16, ... grid points) up while the SLO is met, or down while it is not,
   until a met rate lies next to an unmet one, then bisect between them to adjacent grid points;
3. goodput = the highest met rate; 0 when rate_min is not met ("infeasible"); rate_max when it is
   met ("capped": the configuration may do better).

Assumes SLO attainment falls with the rate (true in general, not guaranteed for every workload).
"""

from __future__ import annotations

import copy
import math
import re
from collections import deque
from dataclasses import dataclass

import numpy as np

from dooly.errors import DoolyError
from dooly.search.grid import Configuration
from dooly.search.slo import Slo, ViolationWatch, Violated, evaluate

GALLOP = 4  # first gallop step, in grid points
MEMO_STEPS = 50_000  # step latencies remembered per step predictor (configurations that batch alike share them)


@dataclass(frozen=True)
class Sweep:
    rate_min: float = 0.05  # requests/s, lowest rate tried
    rate_max: float = 1000.0  # requests/s, highest rate tried
    tolerance: float = 0.05  # ratio between neighbouring grid rates, minus 1
    seed: int = 0  # seed of the Poisson arrival pattern
    early_stop: bool = True  # end a simulation once the SLO is provably violated (same outcomes)
    reuse: bool = True  # run a simulation once for every configuration it provably describes (`Slack`)

    def __post_init__(self):
        if not 0 < self.rate_min < self.rate_max:
            raise DoolyError(f"rates must satisfy 0 < rate_min < rate_max, got {self.rate_min} and {self.rate_max}")
        if not 0 < self.tolerance <= 1:
            raise DoolyError(f"tolerance must be in (0, 1], got {self.tolerance}")

    def rates(self) -> np.ndarray:
        k = math.ceil(math.log(self.rate_max / self.rate_min) / math.log1p(self.tolerance) - 1e-9)
        r = self.rate_min * (1 + self.tolerance) ** np.arange(k + 1)
        r[-1] = self.rate_max
        return r


@dataclass(frozen=True)
class Job:
    """What every worker needs besides its configurations (sent once per chunk)."""

    db_url: str  # the latency database, read by URL wherever the worker runs
    lengths: tuple  # (prompt_tokens, output_tokens) per request, in workload order
    slo: Slo
    sweep: Sweep

    def unit_arrivals(self) -> np.ndarray:
        gaps = np.random.default_rng(self.sweep.seed).exponential(1.0, len(self.lengths))
        gaps[0] = 0.0
        return np.cumsum(gaps)


class Workbench:
    """Per-process state shared across configurations: model specs, the database, and one step
    predictor per (model, dtype, tp, attention backend): the trace is read, the regressors are
    resolved and the count-dependent part of a step is memoised once for all of them."""

    def __init__(self, job: Job):
        from dooly.db import LatencyDB

        self.job = job
        self.db = LatencyDB(job.db_url, create=False)
        self.unit = job.unit_arrivals()
        self.outputs = {str(i): o for i, (_, o) in enumerate(job.lengths)}
        self._specs: dict = {}
        self._steps: dict = {}  # trace key -> StepPredictor, or the DoolyError saying what is missing
        self._memos: dict = {}  # trace key -> {Batch: predicted seconds}
        self._deployments: dict = {}  # configuration -> its Deployment
        self.runs: dict = {}  # (scheduler class, rate) -> [(Slack, Probe)] of the simulations run here

    def spec(self, model: str):
        from dooly.catalog import resolve

        if model not in self._specs:
            self._specs[model] = resolve(model)
        return self._specs[model]

    def step_predictor(self, c: Configuration):
        """The configuration's StepPredictor; raises DoolyError (with `dooly profile ...`) when the
        database cannot answer for it."""
        hit = self._steps.get(c.trace_key)
        if hit is None:
            try:
                hit = self._build(c)
            except DoolyError as e:
                hit = e
            self._steps[c.trace_key] = hit
        if isinstance(hit, DoolyError):
            raise hit
        return hit

    def memo(self, c: Configuration) -> dict:
        return self._memos.setdefault(c.trace_key, {})

    def _build(self, c: Configuration):
        from dooly.predict import Predictor, StepPredictor
        from dooly.trace import trace_model

        d = self.deployment(c)
        trace = trace_model(d.spec, dtype=d.dtype, tensor_parallel_size=d.tensor_parallel_size, cache=True,
                            **d.options.trace_options())
        return StepPredictor(trace, Predictor(self.db, d.env))

    def deployment(self, c: Configuration):
        if c not in self._deployments:
            self._deployments[c] = c.deployment(self.spec(c.model))
        return self._deployments[c]

    def scheduler(self, c: Configuration):
        """A fresh FastScheduler for the configuration, its KV blocks those of one rank."""
        from dooly.sim.scheduler import FastScheduler

        return FastScheduler.for_deployment(self.deployment(c))


def fresh_copy(obj):
    """A copy of a just-built scheduler, one container level deep: its lists, dicts and deques hold
    only immutable values (or nothing) before it has run, so this equals building it again, without
    resolving its settings again (a FastScheduler costs milliseconds to build, a copy microseconds)."""
    new = copy.copy(obj)
    for name, value in vars(obj).items():
        if isinstance(value, (list, dict, set, deque)):
            setattr(new, name, copy.copy(value))
        elif type(value).__module__.startswith("dooly."):  # a part of its own (the block pool)
            setattr(new, name, fresh_copy(value))
    return new


@dataclass
class Probe:
    rate: float  # requests/s
    met: bool  # the SLO holds at this rate
    stopped_early: bool  # the simulation ended once the SLO was provably violated
    steps: int  # engine steps simulated
    stats: dict  # target name -> statistic (seconds); NaN when stopped early


# Scheduler settings a simulation can stand for other values of (see `Slack`); all others must match.
_SLACK_SETTINGS = ("max_num_batched_tokens", "max_num_scheduled_tokens", "max_num_seqs", "max_num_active_seqs",
                   "enable_chunked_prefill", "enable_prefix_caching")


class Slack:
    """How close one run came to the limits configurations differ in: which other configurations the
    same simulation provably describes (step for step), so it is run once for all of them.

    FastScheduler's step depends on these limits only through (vLLM's policy, `dooly.sim.scheduler`):
    - max_active (max_num_seqs): the admission test len(running) < max_active. Every length tested is
      at most the running count after admission (the running list after the step plus the requests
      it finished), so if that never reached max_active, every max_active' above its maximum passes
      every test alike.
    - budget (max_num_batched_tokens): with chunked prefill, a request given less than it needs
      takes the whole remaining budget (the step's tokens = budget) and the loops stop at budget 0.
      If no step reached the budget, neither happened; if moreover no request was turned away (a
      preemption, or waiting requests left while seats were free: a failed KV allocation, whose
      token count is not seen), any budget' above the largest step, with chunked prefill or without
      (a prefill that does not fit the budget is its only other use), schedules alike.
    - prefix caching: without a hit (a request first scheduled with cached context) and without
      preemption, caching changes which blocks are taken but not how many are free: the same steps
      as without it.
    """

    def __init__(self, sched):
        self.sched = sched
        self.budget, self.max_active = sched.budget, sched.max_active
        self.chunked, self.caching = sched.chunked, sched.caching
        self.adaptive = sched.adaptive_long_prefill  # then the budget also sets the long-prefill cap
        self.max_tokens = 0  # largest step, tokens
        self.max_running = 0  # largest running count after admission
        self.turned_away = False  # a preemption, or a failed admission with seats and budget left
        self.cache_mattered = False  # a prefix hit or a preemption happened
        self._seen: set = set()

    def observe(self, s) -> None:
        sched = self.sched
        if s is None:  # nothing scheduled: only the admission test may have run
            running, tokens = len(sched.running), 0
        else:
            running, tokens = len(sched.running) + len(s.finished), s.batch.num_tokens
            if tokens > self.max_tokens:
                self.max_tokens = tokens
        if running > self.max_running:
            self.max_running = running
        if s is not None and s.preempted:
            self.turned_away = self.cache_mattered = True
        elif sched.waiting and running < self.max_active and tokens < self.budget:
            self.turned_away = True
        if s is not None and self.caching and not self.cache_mattered and not self._seen.issuperset(s.req_ids):
            seen = self._seen
            for rid, ctx in zip(s.req_ids, s.batch.context_lens):
                if rid not in seen:
                    seen.add(rid)
                    if ctx:
                        self.cache_mattered = True

    def covers(self, other: Slack) -> bool:
        """Does this run describe `other`'s configuration (a fresh scheduler) step for step?"""
        active = other.max_active == self.max_active or min(other.max_active, self.max_active) > self.max_running
        budget = (other.budget == self.budget and other.chunked == self.chunked) or (
            self.chunked and not self.adaptive and not self.turned_away
            and min(other.budget, self.budget) > self.max_tokens)
        caching = other.caching == self.caching or (self.caching and not self.cache_mattered)
        return active and budget and caching


def scheduler_class(sched, trace_key: tuple) -> tuple:
    """Configurations whose simulations may stand for each other: same step predictor, same settings
    apart from the limits `Slack` accounts for, same KV blocks."""
    st = sched.settings
    return (trace_key, sched.num_blocks, tuple(sorted((k, str(v)) for k, v in st.items() if k not in _SLACK_SETTINGS)))


def estimate_throughput(step, config: Configuration, lengths) -> float:
    """Requests/s at saturation, roughly: prefill in full chunks, decode in batches of every request.

    It does not depend on max_num_seqs, so configurations that behave alike start alike."""
    from dooly.records import Batch

    n = len(lengths)
    prompt = sum(p for p, _ in lengths) / n
    output = sum(o for _, o in lengths) / n
    context = int(prompt + output / 2)
    t_decode = step(Batch((context,) * n, (1,) * n)).us / 1e6
    chunk = max(1, min(config.max_num_batched_tokens, int(prompt)))
    t_prefill = step(Batch((0,), (chunk,))).us / 1e6
    seconds = n * prompt / chunk * t_prefill + max(output - 1, 0) * t_decode
    return n / seconds if seconds > 0 else float("inf")


def evaluate_configuration(bench: Workbench, config: Configuration) -> tuple[dict, list[dict], int]:
    """(the configuration's row, one row per rate tried, simulations run here: the others reused)."""
    job, slo = bench.job, bench.job.slo
    row = {"config": config.key, "model": config.model, **config.options()}
    try:
        step = bench.step_predictor(config)
    except DoolyError as e:
        return {**row, "status": "missing", "reason": profile_command(e, config, job.db_url)}, [], 0
    template = bench.scheduler(config)
    rates = job.sweep.rates()
    runner = _Runner(bench, config, step, template)
    probes: dict[int, Probe] = {}

    def met(k: int) -> bool:
        probes[k] = runner.probe(float(rates[k]))
        return probes[k].met

    top = len(rates) - 1
    guess = estimate_throughput(step, config, job.lengths)
    start = int(np.clip(round(math.log(guess / rates[0]) / math.log1p(job.sweep.tolerance)), 0, top)) \
        if math.isfinite(guess) and guess > 0 else top
    lo = hi = None  # highest met, lowest unmet grid index
    gallop = GALLOP
    if met(start):
        lo = start
        while hi is None and lo < top:
            k = min(lo + gallop, top)
            lo, hi = (k, hi) if met(k) else (lo, k)
            gallop *= 2
    else:
        hi = start
        while lo is None and hi > 0:
            k = max(hi - gallop, 0)
            lo, hi = (k, hi) if met(k) else (lo, k)
            gallop *= 2
    while lo is not None and hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if met(mid) else (lo, mid)
    names = [f"{t.name}_s" for t in slo.targets]
    if lo is None:
        status, goodput, stats = "infeasible", 0.0, dict.fromkeys(names, float("nan"))
        reason = f"the SLO is not met at rate_min={rates[0]:g} requests/s"
    else:
        status, goodput, reason = ("capped" if lo == top else "ok"), float(rates[lo]), ""
        stats = {f"{n}_s": v for n, v in probes[lo].stats.items()}
    row.update(
        {
            "status": status,
            "goodput_rps": goodput,
            "goodput_per_device_rps": goodput / config.tensor_parallel_size,
            **stats,
            "simulations": len(probes),
            "steps": sum(p.steps for p in probes.values()),
            "reason": reason,
        }
    )
    rate_rows = [{"config": config.key, "rate_rps": p.rate, "met": p.met, "stopped_early": p.stopped_early,
                  "steps": p.steps, **{f"{n}_s": v for n, v in p.stats.items()}}
                 for _, p in sorted(probes.items())]
    return row, rate_rows, runner.simulated


class _Runner:
    """Simulations of one configuration at given rates, reusing the workbench's where they apply."""

    def __init__(self, bench: Workbench, config: Configuration, step, template):
        self.bench, self.step, self.template = bench, step, template
        self.vocab = bench.spec(config.model).config["vocab_size"]
        self.cls = scheduler_class(template, config.trace_key)
        self.slack = Slack(template)  # this configuration's limits (nothing observed)
        self.memo = bench.memo(config)
        self.simulated = 0

    def latency(self, batch) -> float:
        memo = self.memo
        seconds = memo.get(batch)
        if seconds is None:
            if len(memo) >= MEMO_STEPS:
                memo.clear()
            seconds = memo[batch] = self.step(batch).us / 1e6
        return seconds

    def probe(self, rate: float) -> Probe:
        from dooly.sim import RequestSpec, simulate

        bench, job = self.bench, self.bench.job
        done = bench.runs.setdefault((self.cls, rate), [])
        if job.sweep.reuse:
            for slack, result in done:
                if slack.covers(self.slack):
                    return result
        unit, slo = bench.unit, job.slo
        requests = [RequestSpec(str(i), float(unit[i] / rate), p, o) for i, (p, o) in enumerate(job.lengths)]
        sched = fresh_copy(self.template)
        slack = Slack(sched)
        watch = ViolationWatch(slo if job.sweep.early_stop else None, sched, self.latency, bench.outputs,
                               observe=slack.observe)
        self.simulated += 1
        try:
            results, steps = simulate(requests, watch, watch.latency, self.vocab)
        except Violated:
            result = Probe(rate, False, True, watch.steps, {t.name: float("nan") for t in slo.targets})
        else:
            met, stats = evaluate(slo, results)
            result = Probe(rate, met, False, len(steps), stats)
        slack.sched = None  # the certificate outlives the run; its scheduler need not
        done.append((slack, result))
        return result


def profile_command(e: DoolyError, c: Configuration, db_url: str) -> str:
    """The `dooly profile ...` command that fills what the database lacks for `c`."""
    said = re.search(r"dooly profile \S+(?: --[\w-]+ \S+)*", str(e))
    if said is not None and "--db " in said.group(0):
        cmd = said.group(0)
    else:  # no data for the environment at all: build the command from the configuration
        cmd = f"dooly profile {c.model}" + (f" --tp {c.tensor_parallel_size}" if c.tensor_parallel_size > 1 else "")
        cmd += f" --db {db_url}"
    if c.dtype != "bfloat16" and "--dtype" not in cmd:
        cmd += f" --dtype {c.dtype}"
    if c.attention_backend and "--attention-backend" not in cmd:
        cmd += f" --attention-backend {c.attention_backend}"
    if c.kv_cache_dtype != "auto" and "--kv-cache-dtype" not in cmd:
        cmd += f" --kv-cache-dtype {c.kv_cache_dtype}"
    if c.quantization and "--quantization" not in cmd:
        cmd += f" --quantization {c.quantization}"
    return cmd
