"""Trace stage: one inference pass of the engine's model code, every dimension labelled by origin."""

from dooly.trace.core import DTYPES, trace_model
from dooly.trace.records import REQUEST_VARS, ArgSpec, OpGroup, Trace, TracedOp

__all__ = ["DTYPES", "REQUEST_VARS", "ArgSpec", "OpGroup", "Trace", "TracedOp", "trace_model"]
