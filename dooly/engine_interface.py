"""What the pipeline's stages may ask of a serving engine, and how they find one by name.

Engines live in `dooly.engines.<name>` (engine-specific code only there) and are reached only
through `get_engine(name)`: the stages depend on this interface, never on an engine module, so a
GPU build or another engine plugs in without touching them. An engine module exposes:

  NAME, version() -> str, request_vars: tuple[str, ...]
  run_trace(config: dict, tp: int, dtype: str, pinned: dict | None) -> RunResult
      one traced forward pass per phase; `pinned` = another run's `dispatch` (kernels to reuse)
  dispatch_key() -> str   the hardware predicates its kernel dispatch reads (part of a trace's cache key)
  attention_backends() -> list[str]
  stateful   its attention/KV-cache rig module (profiling stateful ops through its own set-up)
and, for engines that serve (vLLM): resolve_scheduler_settings(config, dtype, engine_kwargs) -> dict,
Scheduler (its own scheduler driven in virtual time). Optional sibling modules: `replay` (replay
rules, `replay_blocker`), `collectives` (tensor-parallel collectives between real ranks).
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
    dispatch: dict = field(default_factory=dict)  # layer name -> kernel choice made at weight loading;
    #                                               given back as run_trace(pinned=...) to perturbed runs
    dispatch_key: str = ""  # the hardware predicates the engine's kernel dispatch read ("" = none)


def get_engine(name: str):
    if name not in ENGINES:
        raise DoolyError(f"unknown engine {name!r}; engines: {', '.join(ENGINES)}")
    return importlib.import_module(f"dooly.engines.{name}")


def engine_module(name: str, part: str):
    """An engine's optional sibling module (`replay`, `collectives`), or None if it has none."""
    import importlib.util

    full = f"dooly.engines.{name}.{part}"
    return importlib.import_module(full) if importlib.util.find_spec(full) is not None else None
