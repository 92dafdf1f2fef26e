"""Serving simulation in virtual time: arrivals, an engine's scheduler, predicted step latencies.

Model of a step: requests that arrived before the step starts are visible to the scheduler; the
scheduler picks the batch; the step takes `step_latency(batch)` seconds; every request whose prompt
is complete by the end of the step emits one token at the step's end.
"""

from __future__ import annotations

from typing import Callable, Protocol

from dooly.records import Batch, RequestResult, RequestSpec, ScheduledStep, StepResult

__all__ = ["RequestResult", "RequestSpec", "ScheduledStep", "Scheduler", "StepResult", "prompt_ids", "simulate"]


class Scheduler(Protocol):
    def add(self, request_id: str, prompt_token_ids: list[int], output_tokens: int, arrival_s: float) -> None: ...
    def has_work(self) -> bool: ...
    def step(self): ...


def prompt_ids(index: int, n: int, vocab: int) -> list[int]:
    """Token ids of request `index`'s prompt: distinct across requests (no accidental prefix hits)."""
    return [1 + (index * 7919 + j * 31) % (vocab - 2) for j in range(n)]


def simulate(requests: list[RequestSpec], scheduler: Scheduler, step_latency: Callable[[Batch], float],
             vocab: int, max_steps: int = 10_000_000) -> tuple[list[RequestResult], list[StepResult]]:
    pending = sorted(enumerate(requests), key=lambda ir: (ir[1].arrival_s, ir[0]))
    results = {r.request_id: RequestResult(r.request_id, r.arrival_s, r.prompt_tokens, r.output_tokens)
               for r in requests}
    steps: list[StepResult] = []
    now, k, idle = 0.0, 0, 0
    for _ in range(max_steps):
        while k < len(pending) and pending[k][1].arrival_s <= now:
            i, r = pending[k]
            scheduler.add(r.request_id, prompt_ids(i, r.prompt_tokens, vocab), r.output_tokens, r.arrival_s)
            k += 1
        if not scheduler.has_work():
            if k == len(pending):
                break
            now = pending[k][1].arrival_s
            continue
        s = scheduler.step()
        if s is None:  # an empty step (e.g. flushing finished requests), else wait for the next arrival
            idle += 1
            if k < len(pending):
                now = max(now, pending[k][1].arrival_s)
            elif idle > 2:
                raise RuntimeError("the scheduler holds requests it cannot schedule")
            continue
        idle = 0
        end = now + step_latency(s.batch)
        for rid, c, q in zip(s.req_ids, s.batch.context_lens, s.batch.query_lens):
            res = results[rid]
            if c + q >= res.prompt_tokens + len(res.token_times):  # past its prompt: emits a token
                res.token_times.append(end)
        steps.append(StepResult(now, end, s.req_ids, s.batch, s.preempted))
        now = end
    return [results[r.request_id] for r in requests], steps
