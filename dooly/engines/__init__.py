"""Serving engines dooly traces. Engine-specific code lives only in its engine's subpackage.

An engine module exposes:
  NAME, version() -> str, request_vars: tuple[str, ...]
  run_trace(config: dict, tp: int, dtype: str) -> RunResult   (one traced forward pass per phase)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from dooly.errors import DoolyError

ENGINES = ("vllm", "hf")


@dataclass
class RunResult:
    """The raw output of one traced run of an engine's model code."""

    ops: list  # RawOp in execution order, every phase
    symbols: dict  # sympy Symbol of the run's ShapeEnv -> request variable name
    guards: list = field(default_factory=list)  # conditions on request vars the run assumed (text)
    specialized: list = field(default_factory=list)  # request vars the engine pinned to a constant


def get_engine(name: str):
    if name not in ENGINES:
        raise DoolyError(f"unknown engine {name!r}; engines: {', '.join(ENGINES)}")
    return importlib.import_module(f"dooly.engines.{name}")
