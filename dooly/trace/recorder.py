"""A dispatch mode that only records: every aten/custom op executed, with its module path.

Nothing here computes labels or signatures; it turns what ran into RawOp records.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import re
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dooly.trace.records import RawArg, RawOp

# Objects an engine passes to its custom ops that are not tensors (e.g. vLLM's LayerName):
# the engine turns them into (canonical text, attrs describing the kernel).
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")

ObjectDescriber = Callable[[object], "tuple[str, dict] | None"]


def op_name(func) -> str:
    name = func._schema.name
    overload = func._overloadname
    return name if overload == "default" else f"{name}.{overload}"


def _int_value(x):
    if isinstance(x, torch.SymInt):
        return x.node.expr
    return int(x)


def _const_text(x) -> str:
    if isinstance(x, float):
        return repr(float(x))
    if isinstance(x, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(x)
    if x is None or isinstance(x, (bool, str)):
        return repr(x)
    return f"<{type(x).__name__}>"


# Metadata queries that reach the dispatcher only for tensor subclasses (FakeTensor), never in a
# real run: not operations the engine executes.
_NOT_EXECUTED = frozenset({torch.ops.prim.device.default, torch.ops.prim.layout.default})


class _ModulePaths:
    """Tracks the innermost running module of `model` through global forward hooks."""

    def __init__(self, model: torch.nn.Module):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[str] = []

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else ""

    @property
    def layer(self) -> int | None:
        """Index of the decoder layer on the stack (shared modules, e.g. one RoPE, keep one name)."""
        for name in self.stack:
            m = _LAYER.search(name)
            if m:
                return int(m.group(1))
        return None

    @contextlib.contextmanager
    def active(self):
        def pre(module, _args):
            name = self.names.get(id(module))
            if name is not None:
                self.stack.append(name)

        def post(module, _args, _out):
            if id(module) in self.names and self.stack:
                self.stack.pop()

        h1 = torch.nn.modules.module.register_module_forward_pre_hook(pre)
        h2 = torch.nn.modules.module.register_module_forward_hook(post)
        try:
            yield self
        finally:
            h1.remove()
            h2.remove()


class OpRecorder(TorchDispatchMode):
    """Records each dispatched op; ops listed in `leaves` are recorded and run without descent."""

    def __init__(self, paths: _ModulePaths, describe_object: ObjectDescriber | None = None, phase: str = "step"):
        super().__init__()
        self.paths = paths
        self.describe_object = describe_object
        self.phase = phase
        self.ops: list[RawOp] = []

    def _describe(self, x, attrs: dict) -> RawArg:
        if isinstance(x, torch.Tensor):
            contiguous = bool(x.is_contiguous())
            return RawArg("tensor", shape=tuple(_int_value(s) for s in x.shape),
                          dtype=str(x.dtype).removeprefix("torch."), contiguous=contiguous,
                          strides=() if contiguous else tuple(_int_value(s) for s in x.stride()))
        if isinstance(x, (torch.SymInt, int)) and not isinstance(x, bool):
            return RawArg("int", ints=(_int_value(x),))
        if isinstance(x, (list, tuple)):
            if x and all(isinstance(i, torch.Tensor) for i in x):
                return RawArg("tensors", items=tuple(self._describe(i, attrs) for i in x))
            if all(isinstance(i, (torch.SymInt, int)) and not isinstance(i, bool) for i in x):
                return RawArg("ints", ints=tuple(_int_value(i) for i in x))
            # mixed lists (e.g. indices with None) keep their tensors' shapes
            return RawArg("tensors", items=tuple(self._describe(i, attrs) for i in x))
        if self.describe_object is not None and not isinstance(x, (float, bool, str, type(None))):
            described = self.describe_object(x)
            if described is not None:
                text, extra = described
                attrs.update(extra)
                return RawArg("const", value=text)
        return RawArg("const", value=_const_text(x))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _NOT_EXECUTED:
            return func(*args, **kwargs)
        attrs: dict = {}
        described = [self._describe(a, attrs) for a in args]
        described += [dataclasses.replace(self._describe(kwargs[k], attrs), name=k) for k in sorted(kwargs)]
        self.ops.append(RawOp(op_name(func), self.paths.current, tuple(described),
                              tuple(sorted(attrs.items())), self.phase, self.paths.layer))
        return func(*args, **kwargs)


@contextlib.contextmanager
def record_ops(model: torch.nn.Module, describe_object: ObjectDescriber | None = None, phase: str = "step"):
    """Record every op dispatched inside the block, attributed to `model`'s module paths."""
    paths = _ModulePaths(model)
    with paths.active():
        recorder = OpRecorder(paths, describe_object, phase)
        with recorder:
            yield recorder


class OpTimer(TorchDispatchMode):
    """A dispatch mode that only times: wall time of each executed op's own call, summed per op.

    The clock reads bracket the call alone, so the mode's Python is not in the times."""

    def __init__(self):
        super().__init__()
        self._us: dict = {}
        self._calls: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter_ns()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter_ns() - t0
        self._us[func] = self._us.get(func, 0) + elapsed
        self._calls[func] = self._calls.get(func, 0) + 1
        return out

    def totals(self) -> dict[str, list]:
        """{op name: [total microseconds, calls]} of the ops executed so far."""
        return {op_name(f): [ns / 1e3, self._calls[f]] for f, ns in self._us.items() if f not in _NOT_EXECUTED}
