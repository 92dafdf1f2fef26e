"""Cross-model sharing: which operation signatures a list of models has in common."""

from __future__ import annotations

from dataclasses import dataclass

from dooly.trace.records import Trace


@dataclass
class PlanRow:
    model: str
    signatures: int  # distinct signatures in the model's step
    shared: int  # of those, already present in an earlier model of the list
    new: int  # signatures this model adds
    unresolved: int  # dims with no established origin in its trace


def plan(traces: list[Trace]) -> tuple[list[PlanRow], int]:
    """Rows per model in order, and the number of unique signatures over all of them."""
    seen: set[str] = set()
    rows = []
    for t in traces:
        sigs = t.signatures()
        shared = len(sigs & seen)
        rows.append(PlanRow(t.model, len(sigs), shared, len(sigs) - shared, t.unresolved))
        seen |= sigs
    return rows, len(seen)
