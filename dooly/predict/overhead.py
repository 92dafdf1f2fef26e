"""The engine's per-step time outside the traced ops, calibrated on the real engine, stored in the DB.

A served step costs more than the sum of its operations: the scheduler, input preparation, sampling,
output processing, and the model code's own Python between ops (custom-op and IR dispatch), which
grows with the number of ops a step runs. Calibration runs real engine steps of small models of
different depths, takes each step's residual (measured - predicted sum of ops) and fits
    overhead = a + b * num_ops + c * num_reqs + d * num_tokens   (non-negative least squares)
stored under a pseudo-signature like any other measurement of this environment.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict

import numpy as np

from dooly.db import Measurement, point_key

OVERHEAD_OP = "dooly::engine_step_overhead"
OVERHEAD_TEXT = json.dumps({"op": OVERHEAD_OP}, sort_keys=True)
OVERHEAD_SIG = hashlib.sha1(OVERHEAD_TEXT.encode()).hexdigest()[:16]


def executed_ops(trace) -> int:
    """Operations one step dispatches (metadata-only ones included: each costs dispatch time)."""
    return len(trace.ops)


def overhead_point(trace, batch) -> dict[str, int]:
    return {"num_ops": executed_ops(trace), "num_reqs": len(batch.query_lens), "num_tokens": batch.num_tokens}


def overhead_replacement(residuals: list[tuple[dict, float]], cost_s: float) -> tuple:
    """The overhead's points as the median residual per point, for `LatencyDB.replace_measurements`."""
    groups: dict[str, list[float]] = defaultdict(list)
    for point, us in residuals:
        groups[point_key(point)].append(us)
    points = []
    for key, values in groups.items():
        p25, med, p75 = np.percentile(values, [25, 50, 75])
        points.append(Measurement(OVERHEAD_SIG, key, float(med), float(p25), float(p75), len(values),
                                  cost_s / max(len(groups), 1)))
    return OVERHEAD_SIG, OVERHEAD_OP, OVERHEAD_TEXT, points
