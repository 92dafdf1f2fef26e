"""`dooly serve`: a simulated deployment behind an OpenAI-compatible endpoint.

The deployment is resolved as `dooly simulate` resolves it (the model's cached trace, the latency
database's predictor, the engine's scheduler settings and KV blocks); its scheduler runs on the wall
clock (`live.LiveEngine`) behind vLLM's HTTP API (`app`), on uvicorn.

Shutting down (SIGINT or SIGTERM): the server stops taking requests (503), lets those in flight
finish for up to `drain_s` seconds, then exits; a second signal exits at once.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import sys
from dataclasses import dataclass

from dooly.deployment import Deployment
from dooly.errors import DoolyError


GC_THRESHOLD = 50_000  # allocations between young-generation collections (CPython's default: 700)


@dataclass
class Served:
    """What `prepare` resolved: enough to build the app in any event loop."""

    deployment: Deployment
    step_latency: object  # Batch -> predicted seconds
    names: list[str]
    counter: object  # TokenCounter
    buckets: dict


def prepare(model: str, *, db: str | None = None, deployment: Deployment | None = None,
            tokenizer: str | None = None, served_model_name: list[str] | None = None,
            time_scale: float = 1.0, **resolve) -> Served:
    """Resolve everything a server needs before it binds a port (every bad input fails here, in one line)."""
    from dooly.engine_interface import get_engine
    from dooly.predict import StepPredictor
    from dooly.serve.text import TokenCounter
    from dooly.sim.run import model_context

    if not time_scale > 0:
        raise DoolyError(f"time scale must be > 0, got {time_scale}")
    d = deployment or Deployment.resolve(model, **resolve)
    counter = TokenCounter(tokenizer, d.spec.config)
    trace, predictor = model_context(d, db)
    step = StepPredictor(trace, predictor)
    step(_probe_batch())  # every fit the predictor needs, before the first request
    predictor.save_fits()
    names = [n for n in (served_model_name or []) if n] or [model]
    buckets = get_engine(d.engine).metric_buckets(d.max_model_len)
    return Served(d, lambda batch: time_scale * step(batch).us / 1e6, names, counter, buckets)


def _probe_batch():
    from dooly.records import Batch

    return Batch((0, 16), (16, 1))


def build(served: Served):
    """The FastAPI app and its live engine (call inside the event loop that will run them)."""
    from dooly.serve.app import ServeState, build_app
    from dooly.serve.live import LiveEngine
    from dooly.serve.metrics import ServingMetrics
    from dooly.sim.core import prompt_ids
    from dooly.sim.run import make_scheduler

    d = served.deployment
    sched = make_scheduler(d, "fast")
    vocab = d.spec.config["vocab_size"]
    metrics = ServingMetrics(served.names[0], served.buckets)
    engine = LiveEngine(sched, served.step_latency, lambda i, n: prompt_ids(i, n, vocab), observer=metrics)
    metrics.attach(engine)
    state = ServeState(served.names, d.model, d.max_model_len, sched.num_blocks - 1, sched.block_size, engine,
                       metrics, served.counter)
    asgi = build_app(state)

    @asgi.app.on_event("startup")
    async def _start():
        engine.start()

    @asgi.app.on_event("shutdown")
    async def _stop():
        await engine.stop()

    return asgi, state


def check_port(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise DoolyError(f"--port must be 1-65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise DoolyError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise DoolyError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def run(served: Served, host: str = "127.0.0.1", port: int = 8000, drain_s: float = 30.0,
        ready=None) -> None:
    """Serve until interrupted; `ready(url)` is called once the port is bound."""
    import uvicorn

    check_port(host, port)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # first signal: drain; second: uvicorn's own (exit now)
            if state.draining or drain_s <= 0:
                return super().handle_exit(sig, frame)
            state.draining = True
            loop.call_soon_threadsafe(lambda: loop.create_task(drain()))

    async def drain():
        deadline = loop.time() + drain_s
        while not state.engine.idle and loop.time() < deadline:
            await asyncio.sleep(0.05)
        server.should_exit = True

    async def main():
        nonlocal loop, state
        loop = asyncio.get_running_loop()
        app, state = build(served)
        # what start-up built (trace, fits, scheduler) never becomes garbage: keep the collector off
        # it, and collect young objects less often, so a collection does not stall a step's tokens
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
        config = uvicorn.Config(app, host=host, port=port, log_level="critical", access_log=False,
                                http="httptools", timeout_graceful_shutdown=5, lifespan="on")
        server.__init__(config)
        if ready:
            loop.create_task(_when_started(server, ready, f"http://{host}:{port}"))
        await server.serve()

    loop = state = None
    server = Server.__new__(Server)
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


async def _when_started(server, ready, url: str) -> None:
    while not server.started:
        await asyncio.sleep(0.02)
    ready(url)
    sys.stderr.flush()
