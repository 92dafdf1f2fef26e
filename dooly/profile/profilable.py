"""Whether this machine can measure a trace's ops (a trace may be made for another CPU's kernels)."""

from __future__ import annotations

from dooly.engine_interface import get_engine
from dooly.errors import DoolyError
from dooly.records import STATEFUL, STATELESS
from dooly.trace.records import Trace


def not_profilable(trace: Trace) -> dict[str, tuple[str, str]]:
    """Signatures of `trace` this machine cannot measure: signature -> (op, why). A trace made here
    (this engine version, this kernel dispatch) has none; one made for another CPU's kernels (e.g.
    AMX) can."""
    eng = get_engine(trace.engine)
    if trace.engine_version == eng.version() and trace.dispatch_key == eng.dispatch_key():
        return {}  # traced here: every op ran through this build's dispatch
    out: dict[str, tuple[str, str]] = {}
    for g in trace.groups():
        if eng.classify(g.op, g.attrs) in (STATELESS, STATEFUL) and g.signature not in out:
            why = eng.replay_blocker(g.op, g.signature_text, dict(g.attrs))
            if why:
                out[g.signature] = (g.op, why)
    return out


def refuse_unprofilable(trace: Trace, action: str) -> None:
    """One line, and no work, when `trace` holds ops this machine cannot measure (never left out)."""
    blocked = not_profilable(trace)
    if blocked:
        ops = sorted({f"{op} ({why})" for op, why in blocked.values()})
        raise DoolyError(f"cannot {action} {trace.model}: {len(blocked)} of its ops are not profilable here: "
                         f"{'; '.join(ops)}")
