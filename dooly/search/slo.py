"""Service-level objectives: parsing, checking a finished simulation, and proving a violation early.

An SLO is a conjunction of targets `METRIC_STAT=VALUE` (METRIC: ttft | tpot | itl | e2e; STAT:
mean | p50 | p90 | p99; VALUE with unit ms or s), e.g. "ttft_p99=500ms,tpot_p99=50ms". A target is
met when the statistic over the simulated requests is <= its value; the statistics are those of
`dooly.sim.metrics.summary` (numpy's linear-interpolation percentiles; TPOT over requests with more
than one output token, ITL over every gap between consecutive output tokens).

Early stop (`ViolationWatch`): while a simulation runs, every request that is provably over a target
already is counted. For a percentile target over n values at position h = (n - 1) p / 100, once
k >= n - floor(h) values exceed the target, the values at sorted positions floor(h) and above all do,
so the interpolated percentile does too: the SLO is violated whatever the rest of the run does. For
a mean target, the lower bounds of all values summed (exact ones for finished requests, elapsed time
for waiting ones) exceeding n x target proves it. ITL targets are not watched (they never stop a run
early); the outcome of a run is the same with or without the watch.
"""

from __future__ import annotations

import heapq
import math
import re
from dataclasses import dataclass

import numpy as np

from dooly.errors import DoolyError

METRICS = ("ttft", "tpot", "itl", "e2e")
STATS = ("mean", "p50", "p90", "p99")
UNITS = {"ms": 1e-3, "s": 1.0}
_EXAMPLE = "e.g. ttft_p99=500ms,tpot_p99=50ms"
_VALUE = re.compile(r"^([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s)$")


@dataclass(frozen=True)
class Target:
    metric: str  # ttft | tpot | itl | e2e
    stat: str  # mean | p50 | p90 | p99
    seconds: float  # the statistic must be <= this

    @property
    def name(self) -> str:
        return f"{self.metric}_{self.stat}"

    @property
    def percentile(self) -> float | None:
        return None if self.stat == "mean" else float(self.stat[1:])

    def __str__(self) -> str:
        ms = self.seconds * 1e3
        return f"{self.name}={ms:g}ms" if ms < 1e4 else f"{self.name}={self.seconds:g}s"


@dataclass(frozen=True)
class Slo:
    targets: tuple  # Target, in the order given; the first one is the plotted latency

    def __str__(self) -> str:
        return ",".join(map(str, self.targets))


def parse_slo(text: str) -> Slo:
    """"ttft_p99=500ms,tpot_p99=50ms" -> Slo; a bad part raises DoolyError naming it."""
    parts = [p.strip() for p in (text or "").split(",")]
    if not any(parts):
        raise DoolyError(f"empty SLO: give targets METRIC_STAT=VALUE, {_EXAMPLE}")
    targets, seen = [], set()
    for part in parts:
        if not part:
            raise DoolyError(f"bad SLO {text!r}: an empty part between commas")
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        metric, _, stat = key.partition("_")
        if not eq:
            raise DoolyError(f"bad SLO part {part!r}: use METRIC_STAT=VALUE, {_EXAMPLE}")
        if metric not in METRICS:
            raise DoolyError(f"bad SLO part {part!r}: metric {metric!r} is not one of {', '.join(METRICS)}")
        if stat not in STATS:
            raise DoolyError(f"bad SLO part {part!r}: statistic {stat!r} is not one of {', '.join(STATS)}")
        m = _VALUE.match(value)
        if m is None:
            raise DoolyError(f"bad SLO part {part!r}: value {value!r} is not a number with unit ms or s")
        seconds = float(m.group(1)) * UNITS[m.group(2)]
        if not seconds > 0:
            raise DoolyError(f"bad SLO part {part!r}: the target must be > 0")
        if key in seen:
            raise DoolyError(f"bad SLO part {part!r}: {key} is given twice")
        seen.add(key)
        targets.append(Target(metric, stat, seconds))
    return Slo(tuple(targets))


def metric_values(results) -> dict[str, np.ndarray]:
    """Per metric, the values `dooly.sim.metrics.summary` takes its statistics over (seconds)."""
    return {
        "ttft": np.array([r.ttft_s for r in results]),
        "tpot": np.array([r.tpot_s for r in results if len(r.token_times) > 1]),
        "itl": np.concatenate([np.diff(r.token_times) for r in results if len(r.token_times) > 1] or [np.array([])]),
        "e2e": np.array([r.e2e_s for r in results]),
    }


def statistic(values: np.ndarray, stat: str) -> float:
    if not values.size:
        return float("nan")
    return float(values.mean()) if stat == "mean" else float(np.percentile(values, float(stat[1:])))


def evaluate(slo: Slo, results) -> tuple[bool, dict[str, float]]:
    """Whether a finished simulation meets the SLO, and each target's statistic (seconds).

    A statistic over no values (TPOT when every request has one output token) meets its target."""
    values = metric_values(results)
    stats = {t.name: statistic(values[t.metric], t.stat) for t in slo.targets}
    met = all(not (stats[t.name] > t.seconds) for t in slo.targets)
    return met, stats


class Violated(Exception):
    """Raised inside a simulation once the SLO is provably violated."""


class _Tracker:
    """One watched target: how many of its values provably exceed it, and a lower bound of their sum."""

    def __init__(self, target: Target, n: int):
        self.target, self.n = target, n
        p = target.percentile
        self.by_count = p is not None  # a percentile: proved by counting; a mean: by summing
        # values that must exceed the target to prove the percentile does (n + 1: never, for n = 0)
        self.need = n - math.floor((n - 1) * p / 100) if p is not None and n else n + 1
        self.over = 0  # values known to exceed the target
        self.flagged: set = set()
        self.exact_sum = 0.0  # sum of the values known exactly

    def flag(self, rid) -> None:
        if rid not in self.flagged:
            self.flagged.add(rid)
            self.over += 1

    def violated_by_sum(self, lower_sum: float) -> bool:
        limit = self.n * self.target.seconds
        return self.n > 0 and lower_sum > limit + 1e-9 * abs(limit)


class _Since(_Tracker):
    """TTFT (event: first token) or E2E (event: last token): the value is event time - arrival."""

    def __init__(self, target: Target, n: int):
        super().__init__(target, n)
        self.arrived: list = []  # (arrival, rid) in arrival order
        self.next = 0  # arrived[:next] are resolved: exact, or flagged as waiting past the target
        self.done: set = set()
        self.wait_count, self.wait_arrivals = 0, 0.0  # arrived requests still without their event

    def add(self, rid, arrival: float) -> None:
        self.arrived.append((arrival, rid))
        self.wait_count += 1
        self.wait_arrivals += arrival

    def event(self, rid, arrival: float, t: float) -> None:
        value = t - arrival
        self.done.add(rid)
        self.exact_sum += value
        self.wait_count -= 1
        self.wait_arrivals -= arrival
        if value > self.target.seconds:
            self.flag(rid)

    def violated(self, now: float) -> bool:
        """`now`: no event of a waiting request happens at or before it (its value > now - arrival)."""
        arrived, limit = self.arrived, now - self.target.seconds
        while self.next < len(arrived) and arrived[self.next][0] < limit:
            rid = arrived[self.next][1]
            if rid not in self.done:
                self.flag(rid)
            self.next += 1
        if self.by_count:
            return self.over >= self.need
        return self.violated_by_sum(self.exact_sum + self.wait_count * now - self.wait_arrivals)


class _Tpot(_Tracker):
    """TPOT = (last - first token time) / (outputs - 1), over requests with more than one output."""

    def __init__(self, target: Target, outputs: dict):
        self.outputs = outputs
        super().__init__(target, sum(1 for o in outputs.values() if o > 1))
        self.first: dict = {}
        self.finished: set = set()
        self.deadlines: list = []  # heap of (first + target x (outputs - 1), seq, rid)
        self.inv, self.first_inv = 0.0, 0.0  # over unfinished started requests: sum 1/(o-1), sum first/(o-1)

    def started(self, rid, t: float) -> None:
        o = self.outputs[rid]
        if o > 1:
            self.first[rid] = t
            heapq.heappush(self.deadlines, (t + self.target.seconds * (o - 1), len(self.first), rid))
            self.inv += 1 / (o - 1)
            self.first_inv += t / (o - 1)

    def event(self, rid, t: float) -> None:
        o = self.outputs[rid]
        if o > 1:
            t0 = self.first[rid]
            value = (t - t0) / (o - 1)
            self.finished.add(rid)
            self.exact_sum += value
            self.inv -= 1 / (o - 1)
            self.first_inv -= t0 / (o - 1)
            if value > self.target.seconds:
                self.flag(rid)

    def violated(self, now: float) -> bool:
        """An unfinished request past its deadline at `now` finishes later: its TPOT exceeds the target."""
        d = self.deadlines
        while d and d[0][0] < now - 1e-12 * abs(now):
            _, _, rid = heapq.heappop(d)
            if rid not in self.finished:
                self.flag(rid)
        if self.by_count:
            return self.over >= self.need
        return self.violated_by_sum(self.exact_sum + max(0.0, now * self.inv - self.first_inv))


class ViolationWatch:
    """Wraps a scheduler and a step-latency function for `dooly.sim.simulate`; raises `Violated` as
    soon as the SLO is provably violated.

    It reconstructs time from what the loop shows it: a step starts no earlier than the previous
    step's end and than every arrival already handed to the scheduler, and ends `latency` later; the
    step's first tokens and finishes happen at its end. Those are lower bounds on the loop's clock, so
    every bound derived from them holds even where they are not exact."""

    def __init__(self, slo: Slo | None, scheduler, step_latency, outputs: dict, observe=None):
        """slo None: watch nothing (the run goes to its end); observe: called with every step scheduled
        (a ScheduledStep, or None for an empty one)."""
        self.scheduler, self.step_latency, self.observe = scheduler, step_latency, observe
        targets = slo.targets if slo is not None else ()
        self.arrival: dict = {}
        self.ttft = [_Since(t, len(outputs)) for t in targets if t.metric == "ttft"]
        self.e2e = [_Since(t, len(outputs)) for t in targets if t.metric == "e2e"]
        self.tpot = [_Tpot(t, outputs) for t in targets if t.metric == "tpot"]
        self.all = self.ttft + self.e2e + self.tpot
        self.since = self.ttft + self.e2e
        self.clock, self.last_arrival = 0.0, 0.0
        self.pending = None  # the step scheduled and not timed yet
        self.steps = 0
        self.has_work = scheduler.has_work  # passed straight through

    # -- the scheduler protocol (dooly.sim.core.Scheduler) ----------------------------------------
    def add(self, request_id, prompt_token_ids, output_tokens, arrival_s) -> None:
        self.arrival[request_id] = arrival_s
        self.last_arrival = max(self.last_arrival, arrival_s)
        for t in self.since:
            t.add(request_id, arrival_s)
        self.scheduler.add(request_id, prompt_token_ids, output_tokens, arrival_s)

    def step(self):
        s = self.pending = self.scheduler.step()
        if self.observe is not None:
            self.observe(s)
        return s

    # -- the step-latency function ----------------------------------------------------------------
    def latency(self, batch) -> float:
        seconds = self.step_latency(batch)
        s, self.pending = self.pending, None
        end = max(self.clock, self.last_arrival) + seconds
        self.clock = end
        self.steps += 1
        if s is not None and self.all:
            arrival = self.arrival
            if s.first_tokens:
                for rid in s.first_tokens:
                    for t in self.ttft:
                        t.event(rid, arrival[rid], end)
                    for t in self.tpot:
                        t.started(rid, end)
            if s.finished:
                for rid in s.finished:
                    for t in self.e2e:
                        t.event(rid, arrival[rid], end)
                    for t in self.tpot:
                        t.event(rid, end)
            for t in self.all:
                if t.violated(end):
                    raise Violated(t.target.name)
        return seconds
