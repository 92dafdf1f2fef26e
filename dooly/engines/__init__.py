"""Serving engines dooly traces. Engine-specific code lives only in its engine's subpackage; the
stages reach an engine only through `dooly.engine_interface` (which documents what an engine exposes)."""

from dooly.engine_interface import ENGINES, RunResult, get_engine

__all__ = ["ENGINES", "RunResult", "get_engine"]
