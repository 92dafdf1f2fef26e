"""Records that cross stages: the engine options of a deployment, a step's batch, a scheduled step,
requests and their results, and what kind of operation a traced op is. Plain dataclasses with no
behaviour beyond checks and derived values; every stage may import this module, and it imports none.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from dooly.errors import DoolyError


@dataclass(frozen=True)
class EngineOptions:
    """Engine options as vLLM's EngineArgs spell them, with the defaults every entry point uses."""

    max_num_seqs: int | None = None  # requests per step; None: vLLM's default (VLLM_MAX_NUM_SEQS, lowered
    #                                  to max_num_batched_tokens when that is smaller)
    max_num_batched_tokens: int = 4096  # tokens per step (vLLM's default)
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    attention_backend: str | None = None  # None: the engine's choice
    kv_cache_gib: float = 4.0  # KV-cache space of each worker, GiB (vLLM CPU's VLLM_CPU_KVCACHE_SPACE default;
    #                            the real CPU engine takes whole GiB, the simulator any size)
    kv_cache_dtype: str = "auto"  # KV-cache storage as vLLM spells it ("auto": the model's dtype; "fp8", ...):
    #                                what the attention backend offers is checked by Deployment.resolve
    quantization: str | None = None  # weight quantization as vLLM's --quantization spells it (None: the
    #                                  checkpoint's own quantization_config, or none); checked by Deployment.resolve

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is None and name == "max_num_seqs":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise DoolyError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.kv_cache_gib, bool) or not isinstance(self.kv_cache_gib, (int, float)) \
                or not self.kv_cache_gib > 0:
            raise DoolyError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib!r}")
        if not isinstance(self.kv_cache_dtype, str) or not self.kv_cache_dtype:
            raise DoolyError(f"kv_cache_dtype must be a name such as auto or fp8, got {self.kv_cache_dtype!r}")
        if self.quantization is not None and (not isinstance(self.quantization, str) or not self.quantization):
            raise DoolyError(f"quantization must be a method name such as compressed-tensors, got {self.quantization!r}")

    def engine_kwargs(self, tensor_parallel_size: int = 1) -> dict:
        """The scheduler-relevant options as the engine's config builder takes them."""
        kw = {"max_num_batched_tokens": self.max_num_batched_tokens,
              "enable_chunked_prefill": self.enable_chunked_prefill,
              "enable_prefix_caching": self.enable_prefix_caching}
        if self.max_num_seqs is not None:
            kw["max_num_seqs"] = self.max_num_seqs
        if tensor_parallel_size > 1:
            kw["tensor_parallel_size"] = tensor_parallel_size
        if self.attention_backend is not None:
            kw["attention_backend"] = self.attention_backend
        if self.kv_cache_dtype != "auto":
            kw["kv_cache_dtype"] = self.kv_cache_dtype
        if self.quantization is not None:
            kw["quantization"] = self.quantization
        return kw

    def trace_options(self) -> dict:
        """The options that change what a traced step runs (its attention kernel, KV storage and weight
        quantization)."""
        return {"attention_backend": self.attention_backend,
                "kv_cache_dtype": None if self.kv_cache_dtype == "auto" else self.kv_cache_dtype,
                "quantization": self.quantization}

    def replace(self, **changes) -> "EngineOptions":
        """A copy with some options changed (None values are ignored: "not given")."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise DoolyError(f"unknown engine option {unknown[0]!r}; options: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


DEFAULT_OPTIONS = EngineOptions()
# a real engine dooly starts in its own process (validate, calibrate): 1 GiB of KV space per worker
# (memory on small machines); a simulation of it is given the blocks the engine reports
IN_PROCESS_OPTIONS = DEFAULT_OPTIONS.replace(kv_cache_gib=1.0)
VLLM_MAX_NUM_SEQS = 256  # vLLM's default max_num_seqs (what `max_num_seqs=None` resolves to at 256+ tokens)


@dataclass(frozen=True)
class Batch:
    """A step's attention work: per request, tokens already in the KV cache and new tokens."""

    context_lens: tuple  # tokens of each request already cached
    query_lens: tuple  # tokens of each request computed in this step

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def seq_lens(self) -> list[int]:
        return [c + q for c, q in zip(self.context_lens, self.query_lens)]


@dataclass
class ScheduledStep:
    """What one engine step runs."""

    batch: Batch  # per scheduled request: tokens already computed, tokens computed now
    req_ids: list  # in batch order
    finished: list  # requests that finished with this step
    preempted: list  # requests preempted while scheduling this step
    first_tokens: list  # requests that produced their first output token in this step


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload."""

    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass
class RequestResult:
    """One served (or simulated) request."""

    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    token_times: list = field(default_factory=list)  # time of each output token

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.arrival_s

    @property
    def e2e_s(self) -> float:
        return self.token_times[-1] - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


@dataclass
class StepResult:
    """One served (or simulated) engine step."""

    start_s: float
    end_s: float
    req_ids: list
    batch: Batch
    preempted: list


# What kind of work a traced op is, which decides how it is profiled and predicted:
#   stateless   replayed on its own from its signature
#   free        metadata only (a view, a reshape): no time
#   stateful    reads or writes the engine's state (attention, KV-cache writes): measured through the
#               engine's own set-up
#   collective  runs between the ranks of a tensor-parallel group: measured between real ranks
STATELESS, FREE, STATEFUL, COLLECTIVE = "stateless", "free", "stateful", "collective"

# What computation an op is, for comparing its time inside the engine's steps with its isolated
# measurement (`dooly.predict.in_engine`): its family. Metadata ops are FREE, collectives COLLECTIVE.
GEMM, ATTENTION, KV_WRITE, ELEMENTWISE = "gemm", "attention", "kv_write", "elementwise"
OP_FAMILIES = (GEMM, ATTENTION, KV_WRITE, ELEMENTWISE, COLLECTIVE)

# Ops that only reinterpret or allocate (no data movement worth timing); shown with --all.
METADATA_OPS = frozenset({
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::detach", "aten::alias", "aten::empty.memory_format",
    "aten::empty_like", "aten::slice.Tensor", "aten::unsqueeze", "aten::squeeze.dim", "aten::flatten.using_ints",
    "aten::split_with_sizes", "aten::split.Tensor", "aten::t", "aten::transpose.int", "aten::expand",
    "aten::permute", "aten::movedim.int", "aten::select.int", "aten::as_strided", "prim::device",
    "aten::lift_fresh", "aten::_to_copy",
})
# torch.distributed's own ops are collectives whatever the engine; an engine names its own
# (`Engine.collective_prefixes`).
TORCH_COLLECTIVE_PREFIXES = ("c10d::",)


def quantization_name(config: dict) -> str | None:
    """A checkpoint's weight quantization as its config.json names it ("compressed-tensors
    int-quantized", "awq", ...); None for an unquantized model."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        return None
    method = str(qc.get("quant_method", "?"))
    return f"{method} {qc['format']}" if qc.get("format") else method


def is_metadata_op(op: str) -> bool:
    return op in METADATA_OPS


def classify(op: str, attrs: tuple, collective_prefixes: tuple[str, ...] = ()) -> str:
    """The kind of a traced op (above). Stateful ops carry their attention `backend` in their attrs;
    `collective_prefixes` are the engine's collective op names."""
    if is_metadata_op(op):
        return FREE
    if any(k == "backend" for k, _ in attrs):
        return STATEFUL
    if op.startswith(TORCH_COLLECTIVE_PREFIXES + tuple(collective_prefixes)):
        return COLLECTIVE
    return STATELESS


def op_family(op: str, gemm_ops: tuple[str, ...] = (), attention_op: str | None = None,
              kv_write_op: str | None = None, collective_prefixes: tuple[str, ...] = ()) -> str:
    """The family of an op (above), from its name and the engine's op names."""
    if is_metadata_op(op):
        return FREE
    if op == attention_op:
        return ATTENTION
    if op == kv_write_op:
        return KV_WRITE
    if op in gemm_ops:
        return GEMM
    if op.startswith(TORCH_COLLECTIVE_PREFIXES + tuple(collective_prefixes)):
        return COLLECTIVE
    return ELEMENTWISE
