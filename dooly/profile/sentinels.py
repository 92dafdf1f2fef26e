"""How fast this machine is now against when its database was measured: sentinel points.

A few of a model's heaviest stateless signatures are re-timed, at points the database holds, with the
profiler's own method (same replay, same timing). The median ratio of time now to time stored is the
machine's time ratio: > 1 means the machine is slower now. Shared VMs drift (the same step can take
1.6x longer in another process minutes later), so a validation that does not measure the machine's
speed cannot tell model error from drift. A probe takes a second or two and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from dooly.db import Measurement, parse_point
from dooly.engine_interface import get_engine
from dooly.records import STATELESS
from dooly.trace.records import Trace

SENTINELS = 3  # signatures re-timed per probe
MAX_POINT_US = 20_000.0  # a sentinel's stored time at most: a probe stays short


@dataclass(frozen=True)
class Sentinel:
    signature: str
    op: str
    text: str  # the signature's canonical text (what is replayed)
    point: str  # the stored point re-timed
    stored_us: float  # its stored median


def pick_sentinels(trace: Trace, stored: dict[tuple[str, str], Measurement], count: int = SENTINELS) -> list[Sentinel]:
    """The `count` stateless signatures of `trace` that weigh most in a step (executions x stored
    time), each at its largest stored point under MAX_POINT_US; [] if the database holds none."""
    eng = get_engine(trace.engine)
    by_signature: dict[str, list[Measurement]] = {}
    for (sig, _), m in stored.items():
        by_signature.setdefault(sig, []).append(m)
    scored = []
    for g in trace.groups():
        if eng.classify(g.op, g.attrs) != STATELESS or g.signature not in by_signature:
            continue
        points = [m for m in by_signature[g.signature] if 0 < m.median_us <= MAX_POINT_US]
        if points:
            m = max(points, key=lambda m: m.median_us)
            scored.append((g.count * m.median_us, Sentinel(g.signature, g.op, g.signature_text, m.point, m.median_us)))
    scored.sort(key=lambda s: -s[0])
    out, seen = [], set()
    for _, s in scored:
        if s.signature not in seen:
            seen.add(s.signature)
            out.append(s)
    return out[:count]


def time_ratio(sentinels: list[Sentinel], engine: str, threads: int) -> float:
    """Median over the sentinels of (time now / time stored), timed with `threads` threads (the
    environment's); the process's thread count is restored after."""
    import numpy as np
    import torch

    from dooly.profile.replay import materialize
    from dooly.profile.timing import measure

    if not sentinels:
        return float("nan")
    get_engine(engine).load_replay_rules()
    before = torch.get_num_threads()
    torch._C.set_num_threads(threads)  # torch's own setter: an in-process engine makes the public one a no-op
    try:
        ratios = [measure(lambda s=s: materialize(s.text, parse_point(s.point))).median_us / s.stored_us
                  for s in sentinels]
    finally:
        torch._C.set_num_threads(before)
    return float(np.median(ratios))
