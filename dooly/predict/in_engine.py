"""How an op family's time inside the engine's steps compares with its isolated measurement.

The profiler times each op alone (`dooly.profile.timing`). Inside a served step the same op runs
between other ops: caches hold what the previous ops left (the weights of a small model stay in the
last-level cache; a large model's stream from memory), the CPU's clock and the allocator are in
another state. Calibration (`dooly calibrate`) times every op inside real engine steps (the engine's
`time_ops`), sums them per family (gemm, attention, kv_write, elementwise, collective) and divides
by the database's prediction of the same ops at the same point:

    ratio(family, num_tokens) = in-engine time / isolated prediction      (median per size bin)

stored per environment like any other measurement, one pseudo-signature per family, one point per
size bin (num_tokens, the bin's median step size), the ratio in the median column and its quartiles
in the p25/p75 columns. `StepPredictor` multiplies each op's prediction by its family's ratio,
interpolated in log(num_tokens) between bins and held constant beyond the measured ones.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from dooly.db import LatencyDB, Measurement, parse_point, point_key
from dooly.records import OP_FAMILIES

RATIO_OP = "dooly::in_engine_ratio"
MIN_PREDICTED_US = 1.0  # a family whose isolated prediction in a step is below this gives no ratio
MIN_STEPS = 3  # a size bin needs this many steps


def ratio_signature(family: str) -> tuple[str, str]:
    """(signature, text) under which a family's ratios are stored."""
    text = json.dumps({"op": RATIO_OP, "family": family}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16], text


@dataclass
class RatioSample:
    """One family in one timed engine step."""

    family: str
    num_tokens: int
    in_engine_us: float
    predicted_us: float


def size_bin(num_tokens: int) -> int:
    return int(round(math.log2(max(num_tokens, 1))))


def fit_ratios(samples: list[RatioSample]) -> dict[str, list[tuple[int, float, float, float, int]]]:
    """Per family, per size bin: (median num_tokens, median ratio, p25, p75, steps)."""
    groups: dict[tuple[str, int], list[RatioSample]] = defaultdict(list)
    for s in samples:
        if s.predicted_us >= MIN_PREDICTED_US and s.in_engine_us > 0:
            groups[(s.family, size_bin(s.num_tokens))].append(s)
    out: dict[str, list] = defaultdict(list)
    for (family, _), group in sorted(groups.items()):
        if len(group) < MIN_STEPS:
            continue
        ratios = [s.in_engine_us / s.predicted_us for s in group]
        p25, med, p75 = np.percentile(ratios, [25, 50, 75])
        n = int(np.median([s.num_tokens for s in group]))
        out[family].append((n, float(med), float(p25), float(p75), len(group)))
    return dict(out)


def ratio_replacements(curves: dict, cost_s: float) -> list[tuple]:
    """Every family's ratio points (none for a family without any), for `LatencyDB.replace_measurements`."""
    bins = sum(len(c) for c in curves.values())
    out = []
    for family in OP_FAMILIES:
        sig, text = ratio_signature(family)
        points = [Measurement(sig, point_key({"num_tokens": n}), med, p25, p75, steps, cost_s / max(bins, 1))
                  for n, med, p25, p75, steps in curves.get(family, [])]
        out.append((sig, RATIO_OP, text, points))
    return out


class InEngineRatios:
    """The stored ratios of one environment; 1.0 for a family without any."""

    def __init__(self, curves: dict[str, list[tuple]]):
        """`curves`: per family, its size bins as (num_tokens, ratio, ...) (`fit_ratios` gives those)."""
        self.curves = {f: (np.log([b[0] for b in c]), np.array([b[1] for b in c])) for f, c in curves.items() if c}

    @classmethod
    def load(cls, db: LatencyDB, env_key: str) -> "InEngineRatios | None":
        curves = {}
        for family in OP_FAMILIES:
            points = db.points(env_key, ratio_signature(family)[0])
            curves[family] = sorted((parse_point(m.point)["num_tokens"], m.median_us) for m in points.values())
        return cls(curves) if any(curves.values()) else None

    def __call__(self, family: str, num_tokens: int) -> float:
        curve = self.curves.get(family)
        if curve is None:
            return 1.0
        xs, ys = curve
        return float(np.interp(math.log(max(num_tokens, 1)), xs, ys))

    def __bool__(self) -> bool:
        return bool(self.curves)
