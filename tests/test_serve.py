"""`dooly serve` as a client sees it: the real CLI in a subprocess on loopback, driven with httpx and
the `openai` client; streamed and whole answers in vLLM's format, tokens at the predicted times,
`/metrics` under vLLM's names and buckets, OpenAI-style errors that leave the server serving, a client
that disconnects mid-stream (its KV blocks freed), and a shutdown that drains (503 to newcomers)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

DOOLY = str(Path(sys.executable).parent / "dooly")
LIMITS = ["--max-num-batched-tokens", "128", "--max-num-seqs", "8"]  # the `profiled` fixture's grid
NAME = "dooly/tiny-llama"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(db_url: str, *extra: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([DOOLY, "serve", NAME, "--db", db_url, "--port", str(port), *LIMITS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"dooly serve exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("dooly serve did not start in 180 s")


def _stop(proc: subprocess.Popen) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode, proc.stderr.read()


@pytest.fixture(scope="module")
def server(profiled):
    db, _ = profiled
    proc, url = _start(db.url)
    yield url, db
    rc, err = _stop(proc)
    assert rc == 0, err[-2000:]
    assert "Traceback" not in err, err[-3000:]


def _metric(text: str, name: str, **labels) -> float:
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{name} {labels} not in /metrics"
    return total


def _sse(lines) -> list:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_models_health_and_whole_answers(server):
    url, _ = server
    assert httpx.get(f"{url}/health").status_code == 200
    models = httpx.get(f"{url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [NAME] and models["data"][0]["max_model_len"] > 0
    assert "approximate" in models["data"][0]["dooly"]["token_counts"]
    r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": list(range(1, 41)), "max_tokens": 5},
                   timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 40, "completion_tokens": 5, "total_tokens": 45,
                             "prompt_tokens_details": None}
    assert len(body["choices"][0]["text"].split()) == 5
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": NAME, "max_tokens": 3,
                                                       "messages": [{"role": "user", "content": "x" * 120}]},
                   timeout=60)
    chat = r.json()
    assert r.status_code == 200 and chat["object"] == "chat.completion", r.text
    assert chat["choices"][0]["message"]["role"] == "assistant" and chat["usage"]["completion_tokens"] == 3
    assert chat["usage"]["prompt_tokens"] == 30  # approximate: 4 characters per token


def test_stream_follows_the_prediction(server):
    """One request alone: the stream's chunks, usage and [DONE] in vLLM's format, and its first token and
    end at the times `dooly simulate` predicts for the same request (loopback adds milliseconds)."""
    from dooly.api import simulate

    url, db = server
    n_out = 8
    start = time.perf_counter()
    times, events = [], []
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"model": NAME, "prompt": list(range(1, 65)), "max_tokens": n_out, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                times.append(time.perf_counter() - start)
                events.extend(_sse([line]))
    tokens = [e for e in events if e != "[DONE]" and e["choices"]]
    assert len(tokens) == n_out and events[-1] == "[DONE]"
    assert [e["choices"][0]["finish_reason"] for e in tokens] == [None] * (n_out - 1) + ["length"]
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == n_out
    assert len({e["id"] for e in events[:-1]}) == 1
    res = simulate(NAME, f"n=1,prompt=64,output={n_out},arrivals=burst", db=db.url, max_num_batched_tokens=128,
                   max_num_seqs=8)
    ttft, e2e = float(res.requests["ttft_s"][0]), float(res.requests["e2e_s"][0])
    assert ttft * 0.95 <= times[0] <= ttft + 0.25, (times[0], ttft)
    assert e2e * 0.95 <= times[n_out - 1] <= e2e + 0.5, (times[n_out - 1], e2e)


def test_openai_client_streams_chat(server):
    import openai

    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    chunks = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hello " * 10}],
                                                 max_tokens=4, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant" and len(text.split()) == 4
    assert chunks[-1].choices[0].finish_reason == "length"
    done = client.completions.create(model=NAME, prompt="a b c d e f g h", max_tokens=2)
    assert done.usage.completion_tokens == 2 and done.choices[0].finish_reason == "length"


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"model": NAME}).encode(), 400, "missing field: prompt"),
    (json.dumps({"model": NAME, "prompt": "hi", "max_tokens": 10 ** 6}).encode(), 400, "maximum context length"),
    (json.dumps({"model": NAME, "prompt": "hi", "max_tokens": 0}).encode(), 400, "max_tokens must be"),
    (json.dumps({"model": NAME, "prompt": list(range(10 ** 5))}).encode(), 400, "maximum context length"),
    (json.dumps({"model": "gpt-9", "prompt": "hi"}).encode(), 404, "The model `gpt-9` does not exist"),
    (json.dumps({"model": NAME, "prompt": "hi", "n": 2}).encode(), 400, "n must be 1"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, needle):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["code"] == status
    assert err["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status]
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 1}, timeout=30)
    assert ok.status_code == 200


def test_disconnect_aborts_and_frees_kv_blocks_and_metrics_use_vllms_names(server):
    from dooly.engine_interface import get_engine

    url, _ = server
    before = httpx.get(f"{url}/metrics").text
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"prompt": list(range(1, 100)), "max_tokens": 2000, "stream": True}) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got == 3:
                break  # leave mid-stream
    deadline = time.time() + 10
    while time.time() < deadline:
        text = httpx.get(f"{url}/metrics").text
        if _metric(text, "vllm:request_success_total", finished_reason="abort") >= 1:
            break
        time.sleep(0.1)
    assert _metric(text, "vllm:request_success_total", finished_reason="abort") == 1
    assert _metric(text, "vllm:num_requests_running", model_name=NAME, engine="0") == 0
    assert _metric(text, "vllm:kv_cache_usage_perc") == 0.0
    generated = _metric(text, "vllm:generation_tokens_total") - _metric(before, "vllm:generation_tokens_total")
    assert generated >= 3
    # vLLM's histogram bounds, read from the engine
    buckets = get_engine("vllm").metric_buckets(2048)
    les = [float(m) for m in re.findall(r'vllm:time_to_first_token_seconds_bucket\{[^}]*le="([^"+]+)"', text)]
    assert les == [float(b) for b in buckets["time_to_first_token"]]
    lag = httpx.get(f"{url}/dooly/lag").json()
    assert lag["tokens"] > 0 and lag["p50_s"] is not None


def test_shutdown_drains_then_exits(profiled):
    """SIGTERM: a stream in flight completes, a newcomer gets 503, and the process exits 0."""
    db, _ = profiled
    proc, url = _start(db.url)
    try:
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"prompt": list(range(1, 30)), "max_tokens": 1000, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            deadline = time.time() + 10
            while httpx.get(f"{url}/health", timeout=5).status_code != 503 and time.time() < deadline:
                time.sleep(0.05)
            late = httpx.post(f"{url}/v1/completions", json={"prompt": [1], "max_tokens": 1}, timeout=10)
            assert late.status_code == 503 and late.json()["error"]["code"] == 503
            rest = _sse(list(lines))
        assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=30) == 0
    finally:
        rc, err = _stop(proc)
    assert "Traceback" not in err, err[-3000:]


def test_bad_start_up_is_one_line(profiled, tmp_path):
    db, _ = profiled
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        p = subprocess.run([DOOLY, "serve", NAME, "--db", db.url, "--port", str(busy), *LIMITS],
                           capture_output=True, text=True, timeout=300)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1 and f"127.0.0.1:{busy}" in lines[0], p.stderr[-2000:]
    p = subprocess.run([DOOLY, "serve", NAME, "--db", db.url, "--tokenizer", str(tmp_path), *LIMITS],
                       capture_output=True, text=True, timeout=300)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "no tokenizer.json" in lines[0], p.stderr[-2000:]


def test_word_tokenizer_counts_exactly_for_serve_and_export(tmp_path):
    """`--tokenizer words` counts as the tokenizer `dooly export tokenizer` writes for vLLM: one word,
    one token, plus the BOS a Llama tokenizer adds; chat prompts through its template."""
    from dooly.catalog import resolve
    from dooly.serve.text import TokenCounter

    config = resolve(NAME).config
    words = TokenCounter("words", config)
    assert words.exact and words.count("w5 w17 w300") == 4
    assert words.count_chat([{"role": "user", "content": "w5 w6"}, {"role": "user", "content": "w7"}]) == 4
    p = subprocess.run([DOOLY, "export", "tokenizer", NAME, "--out", str(tmp_path / "tok")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    exported = TokenCounter(str(tmp_path / "tok"))
    for text in ("w5 w17 w300", "w1 w2 w7999 zzz", ""):
        assert exported.count(text) == words.count(text)
    assert words.piece(0, 3) and words.piece(1, 3).startswith(" w")
