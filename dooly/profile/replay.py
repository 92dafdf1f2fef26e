"""Replaying one operation in isolation from its signature, with random inputs.

A signature's canonical JSON holds everything needed: the op, each argument's dims (config values as
numbers, request variables by name), dtype, layout and constant arguments. `materialize` builds the
inputs for one point of the request variables; ops whose inputs need more than random tensors (a
oneDNN weight handle, valid expert ids) have a rule, registered once per op (duplicates raise).
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from typing import Callable

import torch

from dooly.registry import registrar
from dooly.trace.instantiate import evaluate

# op -> rule(args, kwargs) -> (args, kwargs, keepalive): fixes up randomly materialised inputs
_RULES: dict[str, Callable] = {}


replay_rule = registrar(_RULES, "replay rule")


class NotReplayable(Exception):
    """The signature holds an argument that cannot be rebuilt from its description."""


@dataclass
class Call:
    """One ready-to-run invocation of an op (a fresh copy of its inputs)."""

    fn: Callable
    args: list
    kwargs: dict
    nbytes: int  # bytes the call reads (inputs, including weights hidden in handles)
    keepalive: list = field(default_factory=list)

    def __call__(self):
        return self.fn(*self.args, **self.kwargs)


def resolve_op(op: str):
    ns, _, rest = op.partition("::")
    name, _, overload = rest.partition(".")
    try:
        packet = getattr(getattr(torch.ops, ns), name)
        return getattr(packet, overload or "default")
    except (AttributeError, RuntimeError) as e:
        raise NotReplayable(f"{op}: no such operator here ({e})") from None


_INT_DTYPES = {torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8}


def _tensor(shape: list[int], dtype: str, strides: list[int] | None) -> torch.Tensor:
    dt = getattr(torch, dtype)
    if strides:  # the traced layout exactly: a view into a larger buffer (e.g. q sliced out of qkv)
        span = 1 + sum((n - 1) * st for n, st in zip(shape, strides)) if all(shape) else 0
        return _random([span], dt).as_strided(shape, strides)
    return _random(list(shape), dt)


def _random(alloc: list[int], dt: torch.dtype) -> torch.Tensor:
    if dt == torch.bool:
        t = torch.rand(alloc) < 0.5
    elif dt in _INT_DTYPES:
        t = torch.randint(0, 2, alloc, dtype=dt)
    else:
        t = torch.randn(alloc, dtype=torch.float32).to(dt)
    return t


def _const(text: str):
    if text.startswith("torch."):
        value = getattr(torch, text.split(".", 1)[1], None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            return value
    if text in ("cpu", "cuda") or text.startswith("cuda:"):
        return torch.device(text)
    if text.startswith("<"):
        raise NotReplayable(f"argument {text} is an engine object")
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise NotReplayable(f"cannot rebuild constant {text!r}") from None


def _arg(a: dict, values: dict[str, int]):
    if "t" in a:
        strides = [evaluate(d, values) for d in a["strides"]] if a.get("strides") else None
        return _tensor([evaluate(d, values) for d in a["t"]], a["dtype"], strides)
    if "int" in a:
        return evaluate(a["int"][0], values)
    if "ints" in a:
        return [evaluate(d, values) for d in a["ints"]]
    if "items" in a:
        return [_arg(i, values) for i in a["items"]]
    return _const(a["c"])


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(i) for i in x)
    return 0


def materialize(signature_text: str, values: dict[str, int]) -> Call:
    """Fresh random inputs for the op at request-variable values `values`."""
    sig = json.loads(signature_text)
    fn = resolve_op(sig["op"])
    args, kwargs = [], {}
    for a in sig["args"]:
        v = _arg(a, values)
        if a.get("name"):
            kwargs[a["name"]] = v
        else:
            args.append(v)
    keep: list = []
    rule = _RULES.get(sig["op"])
    if rule is not None:
        args, kwargs, keep = rule(args, kwargs)
    nbytes = _nbytes(args) + _nbytes(list(kwargs.values())) + _nbytes(keep)
    return Call(fn, args, kwargs, nbytes, keep)


def request_vars_of(signature_text: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """The request variables a signature's dims depend on, in `names` order."""
    return tuple(n for n in names if n in signature_text)
