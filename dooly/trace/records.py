"""Plain records handed from the tracer to later stages (profile, predict, sim).

Vocabulary of request variables (shared by labels, signatures and database columns):
  num_tokens  tokens scheduled in one engine step (vLLM: flattened prefill chunks + decodes)
  num_reqs    requests in the step (rows that get logits)
  batch_size  HF engine: sequences in the padded batch
  seq_len     HF engine: new tokens per sequence in the step
  past_len    HF engine: tokens already in each sequence's KV cache
Config parameters are named as in HF config.json (hidden_size, num_key_value_heads, ...) plus
`head_dim` (explicit or hidden_size/num_attention_heads) and `tp` (tensor-parallel degree).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REQUEST_VARS = ("num_tokens", "num_reqs", "batch_size", "seq_len", "past_len")


@dataclass(frozen=True)
class RawArg:
    """One operation argument as one engine run saw it (dims are ints or sympy expressions)."""

    kind: str  # "tensor" | "int" | "ints" | "tensors" | "const"
    shape: tuple = ()  # tensor: one int/sympy expr per dim
    dtype: str = ""  # tensor: torch dtype name
    contiguous: bool = True  # tensor: is it contiguous in memory
    strides: tuple = ()  # tensor: element strides when not contiguous (ints/sympy), else ()
    ints: tuple = ()  # "int"/"ints": the int/sympy values
    items: tuple = ()  # "tensors": nested RawArg per tensor
    value: str = ""  # "const": canonical text of a float/bool/str/dtype/None/object
    name: str = ""  # keyword argument name ("" = positional)


@dataclass(frozen=True)
class RawOp:
    """One executed operation, as recorded in one engine run."""

    op: str  # "aten::mm", "_C::onednn_mm", "vllm::unified_attention_with_output"
    module: str  # dotted path of the innermost nn.Module running it ("" = outside the model)
    args: tuple  # RawArg per positional argument, then keyword arguments in schema order
    attrs: tuple = ()  # sorted (key, value) pairs: kernel identity not visible in tensors
    phase: str = "step"  # "step" (vLLM mixed step), "prefill" or "decode" (HF)
    layer: int | None = None  # decoder layer running it (from the module stack), None outside layers


@dataclass(frozen=True)
class ArgSpec:
    """One argument with every numeric dimension labelled by its origin."""

    kind: str
    dims: tuple = ()  # expression strings: tensor dims, or the int/ints values
    dtype: str = ""
    contiguous: bool = True
    strides: tuple = ()  # labelled element strides of a non-contiguous tensor
    items: tuple = ()  # "tensors": nested ArgSpec
    value: str = ""
    name: str = ""  # keyword argument name ("" = positional)

    def tensor_dims(self) -> list[tuple]:
        """Dims of every tensor in this argument (a tensor, or a list of tensors)."""
        if self.kind == "tensor":
            return [self.dims]
        return [d for i in self.items for d in i.tensor_dims()]

    def to_json(self) -> dict:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind in ("tensor", "int", "ints"):
            out["dims"] = list(self.dims)
        if self.kind == "tensor":
            out["dtype"], out["contiguous"] = self.dtype, self.contiguous
            if self.strides:
                out["strides"] = list(self.strides)
        if self.kind == "tensors":
            out["items"] = [i.to_json() for i in self.items]
        if self.kind == "const":
            out["value"] = self.value
        if self.name:
            out["name"] = self.name
        return out


@dataclass(frozen=True)
class TracedOp:
    """One executed operation with labelled dims and its canonical signature."""

    op: str
    module: str
    phase: str
    args: tuple  # ArgSpec per argument
    attrs: tuple  # sorted (key, value) pairs
    signature: str  # short hash of `signature_text`
    signature_text: str  # canonical JSON: op, config dims as values, request dims symbolic, attrs
    unresolved: int  # dims of this op whose origin could not be established


@dataclass
class OpGroup:
    """All executions of one signature in one phase of a forward pass (the op table row)."""

    signature: str
    op: str
    module: str  # first module it ran in (layers.N folded to layers.*)
    phase: str
    count: int
    args: tuple  # ArgSpec of the first occurrence
    attrs: tuple
    signature_text: str


@dataclass
class Trace:
    """What `dooly trace` produces for one model on one engine."""

    model: str
    engine: str  # "vllm" | "hf"
    engine_version: str
    tensor_parallel_size: int
    dtype: str
    config_params: dict  # name -> value of every config parameter labels may use
    config: dict  # the model's config.json values (stateful profiling rebuilds layers from it)
    request_vars: tuple  # request variables this engine's ops depend on
    ops: list = field(default_factory=list)  # TracedOp in execution order
    unresolved: int = 0  # dims whose origin could not be established (all ops)
    guards: list = field(default_factory=list)  # conditions on request vars the trace assumed
    notes: list = field(default_factory=list)  # how labels were obtained, fallbacks taken
    seconds: float = 0.0  # wall time of tracing (build + forward passes + labelling)
    dispatch_key: str = ""  # hardware predicates the engine's kernel choices followed (e.g. amx_tile=1,...)
    quantization: str | None = None  # the engine's --quantization it was traced with (None: the checkpoint's own)

    def groups(self) -> list[OpGroup]:
        out: dict[tuple, OpGroup] = {}
        for op in self.ops:
            key = (op.phase, op.signature)
            if key in out:
                out[key].count += 1
            else:
                out[key] = OpGroup(op.signature, op.op, fold_layers(op.module), op.phase, 1, op.args,
                                   op.attrs, op.signature_text)
        return list(out.values())

    @property
    def kv_cache_dtype(self) -> str | None:
        """The KV-cache dtype its attention ops were traced with; None for the model's own ("auto")."""
        found = {dict(o.attrs).get("kv_cache_dtype") for o in self.ops} - {None, "auto"}
        return found.pop() if found else None

    def signatures(self) -> set[str]:
        return {op.signature for op in self.ops}

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "engine": self.engine,
            "engine_version": self.engine_version,
            "tp": self.tensor_parallel_size,
            "dtype": self.dtype,
            "config_params": self.config_params,
            "request_vars": list(self.request_vars),
            "unresolved": self.unresolved,
            "guards": self.guards,
            "notes": self.notes,
            "dispatch": self.dispatch_key,
            "seconds": round(self.seconds, 3),
            "num_ops": len(self.ops),
            "ops": [
                {
                    "op": g.op,
                    "module": g.module,
                    "phase": g.phase,
                    "signature": g.signature,
                    "count": g.count,
                    "dims": [list(d) for a in g.args for d in a.tensor_dims()],
                    "args": [a.to_json() for a in g.args],
                    "attrs": dict(g.attrs),
                }
                for g in self.groups()
            ],
        }


def fold_layers(module: str) -> str:
    """`model.layers.17.mlp` -> `model.layers.*.mlp`: one name for the same op in every layer."""
    import re

    return re.sub(r"\.layers\.\d+(?=\.|$)", ".layers.*", module)
