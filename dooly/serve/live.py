"""The simulated engine on the wall clock: requests join the scheduler `dooly simulate` uses, each
step lasts its predicted latency, and every token is handed out at the time the prediction gives it.

The model of a step is the simulator's (`dooly.sim.core`): the scheduler sees the requests that
arrived before the step starts, picks the batch, and the step ends `step_latency(batch)` seconds
later; every request past its prompt emits one token at the step's end. While there is work, a step
starts where the previous one ended on the predicted timeline (not when the event loop got round to
it), so a late loop does not stretch time: its delay shows as token lateness (`LiveEngine.lateness`),
the time a token is sent minus the time it was due.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

from dooly.records import Batch

WAKE_EARLY_S = 0.002  # event-loop timers fire up to a millisecond late; the last stretch is waited out by yielding


@dataclass
class TokenEvent:
    index: int  # output token number, from 0
    due: float  # predicted time (the clock's) of the step end that produced it
    finish_reason: str | None = None  # "length" with its last token


@dataclass
class LiveRequest:
    request_id: str
    prompt_tokens: int
    max_tokens: int
    arrival: float  # the clock's time it was submitted
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    on_token: Callable | None = None  # called with each TokenEvent as it falls due, instead of queueing it
    emitted: int = 0
    first_due: float | None = None
    last_due: float | None = None
    done: bool = False


class LiveEngine:
    """Drives `scheduler` (dooly's scheduler protocol, with `abort` and `kv_usage`) in real time.

    `step_latency(batch)`: predicted seconds of a step; `observer`: told of every step, first token,
    token and finished request (the metrics)."""

    def __init__(self, scheduler, step_latency: Callable[[Batch], float], prompt_ids: Callable[[int, int], list],
                 observer=None, clock: Callable[[], float] = time.perf_counter):
        self.scheduler = scheduler
        self.step_latency = step_latency
        self.prompt_ids = prompt_ids  # (request number, prompt tokens) -> token ids the scheduler hashes
        self.observer = observer
        self.clock = clock
        self.requests: dict[str, LiveRequest] = {}
        self._arrived: list[LiveRequest] = []
        self._aborted: list[str] = []
        self._wake = asyncio.Event()
        self._numbers = itertools.count()
        self._task: asyncio.Task | None = None
        self.steps = 0

    # -- requests --------------------------------------------------------------------------------

    def submit(self, prompt_tokens: int, max_tokens: int, request_id: str | None = None) -> LiveRequest:
        n = next(self._numbers)
        req = LiveRequest(request_id or f"req-{n}", prompt_tokens, max_tokens, self.clock())
        req._number = n
        self.requests[req.request_id] = req
        self._arrived.append(req)
        self._wake.set()
        return req

    def abort(self, request_id: str) -> None:
        """The client went away: the request leaves the scheduler (its KV blocks freed) before the next step."""
        req = self.requests.pop(request_id, None)
        if req is not None and not req.done:
            req.done = True
            self._aborted.append(request_id)
            if self.observer:
                self.observer.finished(req, "abort")
            self._wake.set()

    @property
    def num_running(self) -> int:
        return len(getattr(self.scheduler, "running", ()))

    @property
    def num_waiting(self) -> int:
        return len(getattr(self.scheduler, "waiting", ())) + len(self._arrived)

    @property
    def idle(self) -> bool:
        return not self.requests

    # -- the loop --------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def _admit(self) -> None:
        sched = self.scheduler
        for rid in self._aborted:
            sched.abort(rid)
        self._aborted.clear()
        for req in self._arrived:
            if not req.done:
                sched.add(req.request_id, self.prompt_ids(req._number, req.prompt_tokens), req.max_tokens,
                          req.arrival)
        self._arrived.clear()

    async def _run(self) -> None:
        sched, clock = self.scheduler, self.clock
        end: float | None = None  # predicted end of the last step, while steps run back to back
        stalled = 0
        while True:
            self._admit()
            if not sched.has_work():
                end = None
                self._wake.clear()
                await self._wake.wait()
                continue
            s = sched.step()
            if s is None:  # flushed finished requests, or nothing fits until something leaves
                stalled += 1
                if stalled > 2:
                    end = None
                    self._wake.clear()
                    await self._wake.wait()
                    stalled = 0
                continue
            stalled = 0
            now = clock()
            start = end if end is not None and end <= now else now
            end = start + self.step_latency(s.batch)
            delay = end - clock() - WAKE_EARLY_S
            if delay > 0:  # the loop's timers round to milliseconds: wake early, then yield until due
                await asyncio.sleep(delay)
            while clock() < end:
                await asyncio.sleep(0)
            self.steps += 1
            done = self._deliver(s, end)
            await asyncio.sleep(0)  # the tokens go out before the bookkeeping and the next step's scheduling
            self._account(s, done, end)

    def _deliver(self, s, due: float) -> list:
        """Hand every token of the step that ended at `due` to its request; the (request, event) pairs."""
        requests = self.requests
        finished = set(s.finished)
        out = []
        for rid, c, q in zip(s.req_ids, s.batch.context_lens, s.batch.query_lens):
            req = requests.get(rid)
            if req is None:  # aborted while the step ran
                continue
            if c + q < req.prompt_tokens + req.emitted:  # a prompt chunk: nothing sampled
                continue
            last = rid in finished or req.emitted + 1 >= req.max_tokens
            event = TokenEvent(req.emitted, due, "length" if last else None)
            req.emitted += 1
            if last:
                req.done = True
                del requests[rid]
            if req.on_token is not None:
                req.on_token(event)
            else:
                req.events.put_nowait(event)
            out.append((req, event))
        return out

    def _account(self, s, delivered: list, due: float) -> None:
        observer = self.observer
        if observer:
            observer.step(s, self)
        for req, ev in delivered:
            if ev.index == 0:
                req.first_due = due
                if observer:
                    observer.first_token(req, due)
            elif observer:
                observer.token(req, due - req.last_due)
            req.last_due = due
            if ev.finish_reason and observer:
                observer.finished(req, "length")
