"""How an op family's time inside the engine's steps compares with its isolated measurement.

The profiler times each op alone (`dooly.profile.timing`). Inside a served step the same op runs
between other ops: caches hold what the previous ops left (the weights of a small model stay in the
last-level cache; a large model's stream from memory), the CPU's clock and the allocator are in
another state. Calibration (`dooly calibrate`) times every op inside real engine steps (the engine's
`time_ops`), sums them per family (gemm, attention, kv_write, elementwise, collective) and divides
by the database's prediction of the same ops at the same point:

    ratio(family, num_tokens) = in-engine time / isolated prediction      (median per size bin)

stored per environment like any other measurement, one pseudo-signature per family, one point per
size bin (num_tokens, the bin's median step size; resident_pct, below), the ratio in the median
column and its quartiles in the p25/p75 columns. `StepPredictor` multiplies each op's prediction by
its family's ratio, interpolated in log(num_tokens) between bins and held constant beyond them.

The ratio is a cache effect, so it depends on the model: the profiler streams every weight from
memory (inputs rotated through 4x the last-level cache), which is how a model whose weights exceed
the cache runs in the engine, while a small model's weights stay in the cache between steps. So a
model's *residency*, the share of its GEMM weights the last-level cache holds (1 when they fit,
LLC / weight bytes otherwise), scales the calibrated deviation:
    applied ratio = 1 + (ratio - 1) * min(1, residency of the model / residency when calibrated)
Calibrated on small models (resident), a model 30x the cache gets ~1: the profiler's own state.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from dooly.db import LatencyDB, Measurement, parse_point, point_key
from dooly.errors import DoolyError
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
    residency: float = 1.0  # of the served model (`residency`)


def weight_bytes(trace, engine) -> int:
    """Bytes of GEMM weights one step reads: per GEMM op, its constant-shaped tensor operands of two
    or more dims (weights passed as tensors), else N x K from its output and input (weights inside a
    handle, as vLLM's `_C::onednn_mm` keeps them)."""
    import json

    from dooly.records import GEMM

    total = 0
    for g in trace.groups():
        if engine.op_family(g.op) != GEMM:
            continue
        tensors = [a for a in json.loads(g.signature_text).get("args", [])
                   if isinstance(a, dict) and isinstance(a.get("t"), list) and a.get("dtype")]
        weights = [a for a in tensors if len(a["t"]) >= 2 and all(str(d).isdigit() for d in a["t"])]
        if weights:
            total += g.count * sum(math.prod(int(d) for d in a["t"]) * _itemsize(a["dtype"]) for a in weights)
        elif len(tensors) >= 2 and str(tensors[0]["t"][-1]).isdigit() and str(tensors[1]["t"][-1]).isdigit():
            total += g.count * int(tensors[0]["t"][-1]) * int(tensors[1]["t"][-1]) * _itemsize(tensors[1]["dtype"])
    return total


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1, "uint8": 1,
             "int32": 4, "int64": 8}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype, 2)


def residency(trace, engine) -> float:
    """Share of the model's GEMM weights this machine's last-level cache can hold (1 when they fit)."""
    from dooly.profile.environment import LLC

    total = weight_bytes(trace, engine)
    return 1.0 if total <= LLC else LLC / total


def family_times(engine, steps: list, timed: list) -> list[dict[str, float]]:
    """Per served step, its ops' in-engine microseconds summed per family (`timed`: the engine's
    `time_ops` tables, one per model step, paired with `steps` in order)."""
    if len(steps) != len(timed):
        raise DoolyError(f"the engine served {len(steps)} steps but ran its model {len(timed)} times: "
                         "cannot pair in-engine op times with steps")
    out = []
    for ops in timed:
        by_family: dict[str, float] = defaultdict(float)
        for op, (us, _calls) in ops.items():
            by_family[engine.op_family(op)] += us
        out.append(dict(by_family))
    return out


def size_bin(num_tokens: int) -> int:
    return int(round(math.log2(max(num_tokens, 1))))


def fit_ratios(samples: list[RatioSample]) -> dict[str, list[tuple[int, float, float, float, int, float]]]:
    """Per family, per size bin: (median num_tokens, median ratio, p25, p75, steps, median residency)."""
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
        out[family].append((n, float(med), float(p25), float(p75), len(group),
                            float(np.median([s.residency for s in group]))))
    return dict(out)


def ratio_replacements(curves: dict, cost_s: float) -> list[tuple]:
    """Every family's ratio points (none for a family without any), for `LatencyDB.replace_measurements`."""
    bins = sum(len(c) for c in curves.values())
    out = []
    for family in OP_FAMILIES:
        sig, text = ratio_signature(family)
        points = [Measurement(sig, point_key({"num_tokens": n, "resident_pct": round(100 * res)}), med, p25, p75,
                              steps, cost_s / max(bins, 1))
                  for n, med, p25, p75, steps, res in curves.get(family, [])]
        out.append((sig, RATIO_OP, text, points))
    return out


class InEngineRatios:
    """The stored ratios of one environment, for a model of a given residency; 1.0 for a family
    without any."""

    def __init__(self, curves: dict[str, list[tuple]], residency: float = 1.0):
        """`curves`: per family, its size bins as (num_tokens, ratio, p25, p75, steps, residency when
        calibrated) (`fit_ratios` gives those); `residency`: the predicted model's (`residency`)."""
        self.curves = {}
        for family, bins in curves.items():
            if bins:
                ns = np.log([b[0] for b in bins])
                ratios = np.array([1 + (b[1] - 1) * min(1.0, residency / max(b[5], 1e-9)) for b in bins])
                self.curves[family] = (ns, ratios)

    @classmethod
    def load(cls, db: LatencyDB, env_key: str, residency: float = 1.0) -> "InEngineRatios | None":
        curves = {}
        for family in OP_FAMILIES:
            points = [(parse_point(m.point), m) for m in db.points(env_key, ratio_signature(family)[0]).values()]
            curves[family] = sorted((p["num_tokens"], m.median_us, m.p25_us, m.p75_us, m.repeats,
                                     p.get("resident_pct", 100) / 100) for p, m in points)
        return cls(curves, residency) if any(curves.values()) else None

    def __call__(self, family: str, num_tokens: int) -> float:
        curve = self.curves.get(family)
        if curve is None:
            return 1.0
        xs, ys = curve
        return float(np.interp(math.log(max(num_tokens, 1)), xs, ys))

    def __bool__(self) -> bool:
        return bool(self.curves)
