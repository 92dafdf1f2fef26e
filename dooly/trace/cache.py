"""A disk cache of traces for the stages that only read them (simulate, validate, search).

A trace is a pure function of the model's config, the engine (and its version), tp, dtype, backend,
and dooly's own tracing code; the cache key hashes all of these, so editing the tracer or upgrading
the engine never serves a stale trace. Stored as JSON (never pickle) under `$DOOLY_CACHE/traces`
(default `~/.cache/dooly/traces`); an unreadable entry is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

from dooly.trace.records import ArgSpec, Trace, TracedOp

FORMAT = 2


def cache_dir() -> Path:
    root = os.environ.get("DOOLY_CACHE") or Path.home() / ".cache" / "dooly"
    return Path(root) / "traces"


@lru_cache(maxsize=None)
def _code_digest(engine: str) -> str:
    """Hash of the source files that produce a trace of `engine` (trace/ and engines/<engine>/)."""
    pkg = Path(__file__).resolve().parent.parent
    files = sorted([*(pkg / "trace").glob("*.py"), *(pkg / "engines" / engine).glob("*.py"),
                    pkg / "engines" / "__init__.py"])
    h = hashlib.sha1()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def cache_key(config: dict, engine: str, engine_version: str, tensor_parallel_size: int, dtype: str, backend, hints,
              dispatch_key: str = "", kv_cache_dtype: str | None = None, quantization: str | None = None) -> str:
    """`dispatch_key`: the hardware predicates the engine's kernel choices read (the same cache may
    be read on another CPU: an AMX machine's trace is not this one's)."""
    text = json.dumps(
        [
            FORMAT,
            config,
            engine,
            engine_version,
            tensor_parallel_size,
            dtype,
            backend,
            hints,
            dispatch_key,
            _code_digest(engine),
            *([kv_cache_dtype] if kv_cache_dtype else []),  # keys of default-KV traces unchanged
            *([{"quantization": quantization}] if quantization else []),
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha1(text.encode()).hexdigest()


def _arg_to_json(a: ArgSpec) -> dict:
    return {"kind": a.kind, "dims": list(a.dims), "dtype": a.dtype, "contiguous": a.contiguous,
            "strides": list(a.strides), "items": [_arg_to_json(i) for i in a.items], "value": a.value,
            "name": a.name}


def _arg_from_json(d: dict) -> ArgSpec:
    return ArgSpec(d["kind"], tuple(d["dims"]), d["dtype"], d["contiguous"], tuple(d["strides"]),
                   tuple(_arg_from_json(i) for i in d["items"]), d["value"], d["name"])


def dump(trace: Trace) -> dict:
    return {
        "format": FORMAT,
        "model": trace.model,
        "engine": trace.engine,
        "engine_version": trace.engine_version,
        "tp": trace.tensor_parallel_size,
        "dtype": trace.dtype,
        "config_params": trace.config_params,
        "config": trace.config,
        "request_vars": list(trace.request_vars),
        "unresolved": trace.unresolved,
        "guards": trace.guards,
        "notes": trace.notes,
        "seconds": trace.seconds,
        "dispatch_key": trace.dispatch_key,
        "quantization": trace.quantization,
        "ops": [
            {
                "op": o.op,
                "module": o.module,
                "phase": o.phase,
                "args": [_arg_to_json(a) for a in o.args],
                "attrs": [list(kv) for kv in o.attrs],
                "signature": o.signature,
                "signature_text": o.signature_text,
                "unresolved": o.unresolved,
            }
            for o in trace.ops
        ],
    }


def load(d: dict) -> Trace:
    ops = [
        TracedOp(
            o["op"],
            o["module"],
            o["phase"],
            tuple(_arg_from_json(a) for a in o["args"]),
            tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in o["attrs"]),
            o["signature"],
            o["signature_text"],
            o["unresolved"],
        )
        for o in d["ops"]
    ]
    return Trace(model=d["model"], engine=d["engine"], engine_version=d["engine_version"],
                 tensor_parallel_size=d["tp"],
                 dtype=d["dtype"], config_params=d["config_params"], config=d["config"],
                 request_vars=tuple(d["request_vars"]), ops=ops, unresolved=d["unresolved"], guards=d["guards"],
                 notes=d["notes"] + ["read from the trace cache"], seconds=d["seconds"],
                 dispatch_key=d["dispatch_key"], quantization=d.get("quantization"))


def get(key: str) -> Trace | None:
    path = cache_dir() / f"{key}.json"
    try:
        d = json.loads(path.read_text())
        return load(d) if d.get("format") == FORMAT else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def put(key: str, trace: Trace) -> None:
    write_atomic(cache_dir() / f"{key}.json", json.dumps(dump(trace)))


def write_atomic(path: Path, text: str) -> None:
    """Write a cache file whole or not at all (readers never see half a file; concurrent writers
    each replace it whole). A cache that cannot be written (a read-only home) only costs a later run
    the work again, so a failure is ignored."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError:
        pass
