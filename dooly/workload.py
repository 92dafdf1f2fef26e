"""Workloads (what simulate, validate, search and calibration serve): synthetic (seeded) and from files,
as RequestSpec lists.

Synthetic: `n` requests; prompt and output lengths fixed ("128"), uniform ("uniform:50:1000") or
normal ("normal:512:128", clipped to >= 1); arrivals "burst" (all at t=0), "poisson:RATE" (requests/s)
or "gamma:RATE:CV" (burstiness CV; CV=1 is Poisson).
Files (by extension / content):
- CSV traces with arrival, prompt and output token columns under any of these names:
  dooly's own (arrival_s, prompt_tokens, output_tokens), Vidur's (arrived_at, num_prefill_tokens,
  num_decode_tokens), Azure's LLM inference trace (TIMESTAMP, ContextTokens, GeneratedTokens).
- vLLM `bench serve --save-result --save-detailed` JSON (input_lens, output_lens, start_times).
- ShareGPT-style JSON (a list of {"conversations": [{"from": "human", ...}, {"from": "gpt", ...}]});
  without a tokenizer, lengths are whitespace-separated words (stated as an approximation).
"""

from __future__ import annotations

import csv
import json
import math
import os
from datetime import datetime
from pathlib import Path

import numpy as np

from dooly.errors import DoolyError
from dooly.records import RequestSpec

# served once by a freshly started real engine before anything is measured (add a seed)
ENGINE_WARMUP = "n=8,prompt=uniform:16:300,output=uniform:4:24,arrivals=burst"
SPEC_KEYS = ("n", "prompt", "output", "arrivals", "seed")
CSV_COLUMNS = {  # field -> accepted column names, first match wins
    "arrival": ("arrival_s", "arrived_at", "TIMESTAMP", "timestamp", "arrival_time"),
    "prompt": ("prompt_tokens", "num_prefill_tokens", "ContextTokens", "input_tokens"),
    "output": ("output_tokens", "num_decode_tokens", "GeneratedTokens"),
}


def _positive(text: str) -> float:
    """A finite number > 0 (ValueError otherwise, as float() raises)."""
    x = float(text)
    if not (math.isfinite(x) and x > 0):
        raise ValueError
    return x


def _lengths(spec: str, n: int, rng: np.random.Generator, what: str) -> np.ndarray:
    parts = spec.split(":")
    try:  # int() refuses "10.5", so lengths are whole numbers
        if len(parts) == 1:
            out = np.full(n, int(parts[0]))
        elif parts[0] == "uniform" and len(parts) == 3:
            out = rng.integers(int(parts[1]), int(parts[2]) + 1, n)
        elif parts[0] == "normal" and len(parts) == 3:
            mean, std = float(parts[1]), float(parts[2])
            if not (math.isfinite(mean) and math.isfinite(std) and std >= 0):
                raise ValueError
            out = np.maximum(1, np.rint(rng.normal(mean, std, n))).astype(int)
        else:
            raise ValueError
    except (ValueError, IndexError):
        raise DoolyError(f"bad {what} length {spec!r}: use N, uniform:A:B or normal:MEAN:STD") from None
    if (out < 1).any():
        raise DoolyError(f"{what} lengths must be >= 1, got {spec!r}")
    return out


def _arrivals(spec: str, n: int, rng: np.random.Generator) -> np.ndarray:
    parts = spec.split(":")
    try:
        if parts == ["burst"]:
            return np.zeros(n)
        if parts[0] == "poisson" and len(parts) == 2:
            gaps = rng.exponential(1 / _positive(parts[1]), n)
        elif parts[0] == "gamma" and len(parts) == 3:
            rate, shape = _positive(parts[1]), 1 / _positive(parts[2]) ** 2
            gaps = rng.gamma(shape, 1 / (rate * shape), n)
        else:
            raise ValueError
    except (ValueError, OverflowError, ZeroDivisionError):
        raise DoolyError(f"bad arrivals {spec!r}: use burst, poisson:RATE or gamma:RATE:CV "
                         "(RATE and CV finite numbers > 0)") from None
    gaps[0] = 0.0
    return np.cumsum(gaps)


def synthetic(n: int, prompt: str = "512", output: str = "128", arrivals: str = "burst",
              seed: int = 0) -> list[RequestSpec]:
    if n <= 0:
        raise DoolyError(f"number of requests must be > 0, got {n}")
    rng = np.random.default_rng(seed)
    p, o, t = _lengths(prompt, n, rng, "prompt"), _lengths(output, n, rng, "output"), _arrivals(arrivals, n, rng)
    return [RequestSpec(str(i), float(t[i]), int(p[i]), int(o[i])) for i in range(n)]


def _missing(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _int_field(value, path: Path, row: int, field: str) -> int:
    """A token count: a whole number >= 1 ("10" and 10.0 pass, "10.5" and "nan" do not)."""
    if _missing(value):
        raise DoolyError(f"{path}: row {row}: {field} is missing")
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        raise DoolyError(f"{path}: row {row}: {field} {value!r} is not a number") from None
    if not x.is_integer():
        raise DoolyError(f"{path}: row {row}: {field} {value!r} is not a whole number")
    if x < 1:
        raise DoolyError(f"{path}: row {row}: {field} must be >= 1, got {int(x)}")
    return int(x)


def _timestamp(value, path: Path, row: int) -> float:
    try:  # Azure's trace: "2023-11-16 18:15:46.6805900" (sub-microsecond digits dropped)
        text = str(value)
        if "." in text:
            head, frac = text.split(".", 1)
            text = f"{head}.{frac[:6]}"
        return datetime.fromisoformat(text).timestamp()
    except (ValueError, OverflowError, OSError):
        raise DoolyError(f"{path}: row {row}: arrival time {value!r} is neither seconds nor a timestamp") from None


def _time_field(value, path: Path, row: int) -> float:
    """Seconds or a timestamp; finite and >= 0."""
    if _missing(value):
        raise DoolyError(f"{path}: row {row}: arrival time is missing")
    try:
        t = float(value)
    except (TypeError, ValueError, OverflowError):
        t = _timestamp(value, path, row)
    if not math.isfinite(t):
        raise DoolyError(f"{path}: row {row}: arrival time {value!r} is not finite")
    if t < 0:
        raise DoolyError(f"{path}: row {row}: arrival time must be >= 0, got {t}")
    return t


def _check(path: Path, rows: list[tuple[int, float, int, int]], max_len: int | None) -> list[RequestSpec]:
    """rows: (row number as the file counts it, arrival, prompt tokens, output tokens), in arrival order."""
    if not rows:
        raise DoolyError(f"{path}: no requests")
    t0 = rows[0][1]
    out = []
    for i, (row, t, p, o) in enumerate(rows):
        if i and t < rows[i - 1][1]:
            raise DoolyError(f"{path}: row {row}: arrival time {t} is earlier than the row before ({rows[i - 1][1]})")
        if max_len is not None and p + o > max_len:
            raise DoolyError(f"{path}: row {row}: prompt_tokens {p} + output_tokens {o} exceed the model's "
                             f"max length {max_len}")
        out.append(RequestSpec(str(i), t - t0, p, o))
    return out


def load(path: str | Path, max_len: int | None = None) -> list[RequestSpec]:
    path = Path(path)
    if not path.is_file():
        raise DoolyError(f"{path}: no such workload file")
    if path.suffix.lower() == ".csv":
        return _load_csv(path, max_len)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DoolyError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise DoolyError(f"{path}: not a UTF-8 text file") from None
    if isinstance(data, dict) and "input_lens" in data:
        return _load_bench_serve(path, data, max_len)
    if isinstance(data, list) and data and isinstance(data[0], dict) and "conversations" in data[0]:
        return _load_sharegpt(path, data, max_len)
    raise DoolyError(f"{path}: not a CSV trace, vLLM bench serve result or ShareGPT-style JSON")


def _load_csv(path: Path, max_len: int | None) -> list[RequestSpec]:
    try:
        return _check(path, _csv_rows(path), max_len)
    except UnicodeDecodeError:
        raise DoolyError(f"{path}: not a UTF-8 text file") from None
    except csv.Error as e:
        raise DoolyError(f"{path}: malformed CSV ({e})") from None


def _csv_rows(path: Path) -> list[tuple[int, float, int, int]]:
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is no header
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        cols = {}
        for field, names in CSV_COLUMNS.items():
            found = next((n for n in names if n in header), None)
            if found is None:
                raise DoolyError(f"{path}: missing column for {field} (one of {', '.join(names)})")
            cols[field] = found
        rows = []
        for i, rec in enumerate(reader, start=1):  # a short row gives None for the missing columns
            rows.append((i, _time_field(rec[cols["arrival"]], path, i),
                         _int_field(rec[cols["prompt"]], path, i, "prompt tokens"),
                         _int_field(rec[cols["output"]], path, i, "output tokens")))
    return rows


def _load_bench_serve(path: Path, data: dict, max_len: int | None) -> list[RequestSpec]:
    inputs, outputs = data.get("input_lens"), data.get("output_lens")
    if not isinstance(inputs, list):
        raise DoolyError(f"{path}: bench serve result's input_lens is not a list")
    if not isinstance(outputs, list) or len(outputs) != len(inputs):
        raise DoolyError(f"{path}: bench serve result lacks output_lens matching input_lens")
    starts = data.get("start_times") or [0.0] * len(inputs)
    if not isinstance(starts, list) or len(starts) != len(inputs):
        raise DoolyError(f"{path}: bench serve result's start_times do not match input_lens")
    rows = [(i + 1, _time_field(starts[i], path, i + 1), _int_field(inputs[i], path, i + 1, "input_lens"),
             _int_field(outputs[i], path, i + 1, "output_lens")) for i in range(len(inputs))]
    return _check(path, sorted(rows, key=lambda r: r[1]), max_len)  # bench serve records in completion order


def _load_sharegpt(path: Path, data: list, max_len: int | None) -> list[RequestSpec]:
    rows = []
    for i, item in enumerate(data, start=1):
        conv = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(conv, list) or not all(isinstance(c, dict) for c in conv):
            raise DoolyError(f"{path}: row {i}: not a conversation (a dict whose conversations are a list of turns)")
        human = next((c.get("value", "") for c in conv if c.get("from") == "human"), None)
        reply = next((c.get("value", "") for c in conv if c.get("from") == "gpt"), None)
        if human is None or reply is None:
            raise DoolyError(f"{path}: row {i}: conversation lacks a human turn or a gpt reply")
        if not isinstance(human, str) or not isinstance(reply, str):
            raise DoolyError(f"{path}: row {i}: a conversation value is not text")
        rows.append((i, 0.0, max(1, len(human.split())), max(1, len(reply.split()))))
    return _check(path, rows, max_len)


def _spec_int(spec: str, key: str, value: str, least: int) -> int:
    try:
        x = int(value)
    except ValueError:
        raise DoolyError(f"workload {spec!r}: {key} {value!r} is not a whole number") from None
    if x < least:
        raise DoolyError(f"workload {spec!r}: {key} must be >= {least}, got {x}")
    return x


def parse_workload(spec, max_len: int | None = None):
    """A file path, or a synthetic spec "n=200,prompt=uniform:50:1000,output=128,arrivals=poisson:2,seed=0"."""
    if isinstance(spec, list):
        return spec
    if os.path.exists(spec) or spec.endswith((".csv", ".json")):
        return load(spec, max_len)
    fields = {}
    for part in spec.split(","):
        key, eq, value = (s.strip() for s in part.partition("="))
        if not eq:
            raise DoolyError(f"bad workload {spec!r}: {part!r} is not KEY=VALUE; give a file, or "
                             "n=N,prompt=...,output=...,arrivals=...,seed=S")
        if key not in SPEC_KEYS:
            raise DoolyError(f"unknown workload key {key!r} in {spec!r}: keys are {', '.join(SPEC_KEYS)}")
        if key in fields:
            raise DoolyError(f"workload key {key!r} given twice in {spec!r}")
        fields[key] = value
    n = _spec_int(spec, "n", fields.pop("n", "100"), 1)  # the defaults when left out
    seed = _spec_int(spec, "seed", fields.pop("seed", "0"), 0)
    try:
        reqs = synthetic(n, seed=seed, **fields)
    except DoolyError as e:
        raise DoolyError(f"workload {spec!r}: {e}") from None
    if max_len is not None:
        too_long = next((r for r in reqs if r.prompt_tokens + r.output_tokens > max_len), None)
        if too_long is not None:
            raise DoolyError(f"workload request {too_long.request_id}: {too_long.prompt_tokens} + "
                             f"{too_long.output_tokens} tokens exceed the model's max length {max_len}")
    return reqs
