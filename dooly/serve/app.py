"""The OpenAI-compatible HTTP face of a simulated deployment (FastAPI, as vLLM's own server):
`/v1/models`, `/v1/completions` and `/v1/chat/completions` (streamed as server-sent events or
whole, with `usage`), `/health`, `/metrics`, and `/dooly/lag` (token lateness so far).

Bodies and stream chunks follow vLLM's; errors are OpenAI-style bodies
(`{"error": {"message", "type", "param", "code"}}`) with the status vLLM gives, and the server keeps
serving after any of them."""

from __future__ import annotations

import asyncio
import collections
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi.responses import Response

from dooly.serve.live import LiveEngine
from dooly.serve.metrics import ServingMetrics
from dooly.serve.text import TokenCounter

ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}
COMPLETION_MAX_TOKENS = 16  # the OpenAI and vLLM default of /v1/completions


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass
class ServeState:
    model_names: list[str]  # served names; the first is the default
    root: str  # the model as given
    max_model_len: int
    max_blocks: int  # KV blocks a request may hold (the engine's, less the null block)
    block_size: int
    engine: LiveEngine
    metrics: ServingMetrics
    counter: TokenCounter
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False


def build_app(state: ServeState) -> "Generation":
    app = FastAPI(title="dooly serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.dooly = state

    @app.get("/health")
    async def health():
        return Response(status_code=503 if state.draining else 200)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/dooly/lag")
    async def lag():
        return {**state.metrics.lag(), "steps": state.engine.steps}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": state.created, "owned_by": "vllm", "root": state.root,
             "parent": None, "max_model_len": state.max_model_len, "permission": [],
             "dooly": {"simulated": True, "token_counts": state.counter.source}}
            for name in state.model_names]}

    return Generation(app, state)


class Generation:
    """POST /v1/completions and /v1/chat/completions as a plain ASGI layer in front of the app: a
    streamed token costs one queue hand-off and one write, with no framework between (at 1,000
    streams the framework's per-chunk work made tokens late)."""

    PATHS = {"/v1/completions": False, "/v1/chat/completions": True}

    def __init__(self, app: FastAPI, state: ServeState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        chat = self.PATHS.get(scope.get("path")) if scope["type"] == "http" else None
        if chat is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        await _handle(scope, receive, send, self.state, chat)


async def _handle(scope, receive, send, state: ServeState, chat: bool) -> None:
    if state.draining:
        return await _send_json(send, 503, _error_body(503, "the server is shutting down"))
    try:
        body = await _json_body(receive)
        model = _model(body, state)
        prompt_tokens, max_tokens = _chat_lengths(body, state) if chat else _completion_lengths(body, state)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(400, "stream must be true or false", "stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise RequestError(400, "stream_options must be an object", "stream_options")
    except RequestError as e:
        return await _send_json(send, e.status, _error_body(e.status, e.message, e.param))
    kind = "chatcmpl" if chat else "cmpl"
    req = state.engine.submit(prompt_tokens, max_tokens, f"{kind}-{uuid.uuid4().hex}")
    writer = asyncio.current_task()
    watch = asyncio.ensure_future(_on_disconnect(receive, writer, req))
    try:
        if stream:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
            sse = EventStream(req, model, state, chat, bool(opts.get("include_usage")), Sink(send))
            req.on_token = sse.token
            await sse.closed
        else:
            await _send_json(send, 200, await _whole(req, model, state, chat))
    except asyncio.CancelledError:  # the client went away, or the server stops
        if not req.done:
            state.engine.abort(req.request_id)
        if not watch.done():
            raise
    finally:
        watch.cancel()


async def _on_disconnect(receive, writer: asyncio.Task, req) -> None:
    """Cancel the request's writer when its client disconnects (the request is aborted)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    if not req.done:
        writer.cancel()


def _error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "InternalServerError"), "param": param,
                      "code": status}}


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


# -- request bodies ------------------------------------------------------------------------------

async def _json_body(receive) -> dict:
    raw = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise asyncio.CancelledError  # gone before its body arrived
        raw += message.get("body", b"")
        if not message.get("more_body"):
            break
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise RequestError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    return body


def _model(body: dict, state: ServeState) -> str:
    model = body.get("model")
    if model is None:
        return state.model_names[0]
    if model not in state.model_names:
        raise RequestError(404, f"The model `{model}` does not exist.", "model")
    return model


def _positive_int(body: dict, name: str, default):
    value = body.get(name, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RequestError(400, f"{name} must be a positive integer, got {json.dumps(value)}", name)
    return value


def _check_n(body: dict) -> None:
    n = body.get("n", 1)
    if n != 1:
        raise RequestError(400, f"n must be 1 (one choice per request is simulated), got {json.dumps(n)}", "n")


def _completion_lengths(body: dict, state: ServeState) -> tuple[int, int]:
    if "prompt" not in body:
        raise RequestError(400, "missing field: prompt", "prompt")
    _check_n(body)
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        n = state.counter.count(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        n = len(prompt)
    else:
        raise RequestError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt")
    if n < 1:
        raise RequestError(400, "the prompt is empty", "prompt")
    return n, _limit(state, n, _positive_int(body, "max_tokens", COMPLETION_MAX_TOKENS))


def _chat_lengths(body: dict, state: ServeState) -> tuple[int, int]:
    messages = body.get("messages")
    if messages is None:
        raise RequestError(400, "missing field: messages", "messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m
                                                                  for m in messages):
        raise RequestError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    _check_n(body)
    n = max(state.counter.count_chat(messages), 1)
    max_tokens = _positive_int(body, "max_completion_tokens", None) or _positive_int(body, "max_tokens", None)
    return n, _limit(state, n, max_tokens)


def _limit(state: ServeState, prompt_tokens: int, max_tokens: int | None) -> int:
    """max_tokens checked against the model's length and the KV cache (as vLLM refuses them)."""
    length = state.max_model_len
    if prompt_tokens >= length:
        raise RequestError(400, f"This model's maximum context length is {length} tokens. However, your prompt "
                                f"has {prompt_tokens} tokens. Please reduce the length of the prompt.", "prompt")
    if max_tokens is None:
        max_tokens = length - prompt_tokens
    if prompt_tokens + max_tokens > length:
        raise RequestError(400, f"This model's maximum context length is {length} tokens. However, you requested "
                                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} "
                                f"in the completion). Please reduce the length of the prompt or completion.",
                           "max_tokens")
    need = -(-(prompt_tokens + max_tokens) // state.block_size)
    if need > state.max_blocks:
        raise RequestError(400, f"the request needs {need} KV-cache blocks ({prompt_tokens} + {max_tokens} tokens) "
                                f"and the engine has {state.max_blocks}", "max_tokens")
    return max_tokens


# -- responses -----------------------------------------------------------------------------------

def _usage(req) -> dict:
    return {"prompt_tokens": req.prompt_tokens, "total_tokens": req.prompt_tokens + req.emitted,
            "completion_tokens": req.emitted, "prompt_tokens_details": None}


async def _events(req, state: ServeState):
    """The request's tokens as they fall due, each timed against its due time as it goes out; the
    request is aborted (its KV blocks freed) if the client goes away first."""
    clock, sent = state.engine.clock, state.metrics.sent
    try:
        while True:
            ev = await req.events.get()
            sent(clock() - ev.due)
            yield ev
            if ev.finish_reason:
                return
    finally:
        if not req.done:
            state.engine.abort(req.request_id)


class Sink:
    """Writes to one client from whatever code has the bytes, without a task switch: the ASGI send
    runs to completion at once unless the connection is paused (flow control), and only then does
    a task finish it, with the writes that follow queued behind it in order."""

    def __init__(self, send):
        self.send = send
        self.backlog: collections.deque | None = None  # writes waiting behind a paused one
        self.idle: asyncio.Future | None = None  # resolved when the backlog is written

    def write(self, message: dict) -> None:
        if self.backlog is not None:
            self.backlog.append(message)
            return
        coro = self.send(message)
        try:
            blocked = coro.send(None)
        except StopIteration:
            return
        self.backlog = collections.deque()
        self.idle = asyncio.get_running_loop().create_future()
        asyncio.ensure_future(self._finish(coro, blocked))

    async def _finish(self, coro, blocked) -> None:
        try:
            await _Resumed(coro, blocked)
            while self.backlog:
                await self.send(self.backlog.popleft())
        finally:
            self.backlog = None
            if not self.idle.done():
                self.idle.set_result(None)


class _Resumed:
    """Awaits a coroutine that was started by hand and suspended on `blocked` (a future)."""

    def __init__(self, coro, blocked):
        self.coro, self.blocked = coro, blocked

    def __await__(self):
        blocked = self.blocked
        while True:
            try:
                yield blocked
            except BaseException as e:  # cancelled while waiting: pass it on
                blocked = self.coro.throw(e)
                continue
            try:
                blocked = self.coro.send(None)
            except StopIteration:
                return


class EventStream:
    """One streamed answer (server-sent events in vLLM's chunk format): each token is written by
    the engine's loop the moment it falls due, and timed against its due time as it goes out."""

    def __init__(self, req, model: str, state: ServeState, chat: bool, include_usage: bool, sink: Sink):
        self.req, self.state, self.chat, self.include_usage, self.sink = req, state, chat, include_usage, sink
        self.closed = asyncio.get_running_loop().create_future()
        created, name = int(time.time()), json.dumps(model)
        kind = "chat.completion.chunk" if chat else "text_completion"
        self.prefix = f'data: {{"id":"{req.request_id}","object":"{kind}","created":{created},"model":{name},'
        self.head = self.prefix + '"choices":[{"index":0,'

    def token(self, ev) -> None:
        req, state = self.req, self.state
        text = json.dumps(state.counter.piece(ev.index, req._number))
        reason = '"length"' if ev.finish_reason else "null"
        if self.chat:
            chunk = (self.head + '"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}'
                     '\n\n' if ev.index == 0 else "")
            chunk += (self.head + f'"delta":{{"content":{text}}},"logprobs":null,"finish_reason":{reason},'
                      '"stop_reason":null}]}\n\n')
        else:
            chunk = (self.head + f'"text":{text},"logprobs":null,"finish_reason":{reason},"stop_reason":null}}],'
                     '"usage":null}\n\n')
        if ev.finish_reason:
            if self.include_usage:
                chunk += self.prefix + f'"choices":[],"usage":{json.dumps(_usage(req))}}}\n\n'
            chunk += "data: [DONE]\n\n"
        state.metrics.sent(state.engine.clock() - ev.due)
        self.sink.write({"type": "http.response.body", "body": chunk.encode(), "more_body": not ev.finish_reason})
        if ev.finish_reason:
            self._close()

    def _close(self) -> None:
        def done(_=None):
            if not self.closed.done():
                self.closed.set_result(None)

        if self.sink.idle is not None and not self.sink.idle.done():
            self.sink.idle.add_done_callback(done)
        else:
            done()


async def _whole(req, model: str, state: ServeState, chat: bool) -> dict:
    pieces = [state.counter.piece(ev.index, req._number) async for ev in _events(req, state)]
    text = "".join(pieces)
    created = int(time.time())
    if chat:
        return {"id": req.request_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                             "logprobs": None, "finish_reason": "length", "stop_reason": None}],
                "usage": _usage(req)}
    return {"id": req.request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length",
                         "stop_reason": None, "prompt_logprobs": None}],
            "usage": _usage(req)}
