"""Latency of one engine step: the traced op list with the step's request variables substituted.

    step latency = sum over the trace's ops of count x predicted latency
                   (stateless: at num_tokens / num_reqs; attention: at the step's batch composition;
                    KV-cache write: at num_tokens; metadata-only ops: 0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dooly.errors import DoolyError
from dooly.predict.predictor import Predictor
from dooly.profile.batches import Batch
from dooly.profile.runner import COLLECTIVE, FREE, STATEFUL, STATELESS, classify
from dooly.trace.records import Trace


@dataclass
class StepPrediction:
    us: float  # predicted latency of the step: its ops, plus the engine's calibrated per-step overhead
    uncertainty_us: float  # root-sum-square of the per-op bands (repeats of one op add linearly)
    extrapolated: bool  # some op was predicted outside its measured range
    by_kind: dict = field(default_factory=dict)  # stateless / stateful / overhead -> us
    calibrated: bool = False  # the environment's per-step overhead was known and included


def predict_step(trace: Trace, predictor: Predictor, batch: Batch, overhead: bool = True) -> StepPrediction:
    if trace.engine != "vllm":
        raise DoolyError(f"step prediction needs a vLLM trace (one op list per step), got {trace.engine}")
    values = {"num_tokens": batch.num_tokens, "num_reqs": len(batch.query_lens)}
    total, var, extrapolated = 0.0, 0.0, False
    by_kind = {STATELESS: 0.0, STATEFUL: 0.0}
    for g in trace.groups():
        kind = classify(g.op, g.attrs)
        if kind == FREE:
            continue
        if kind == COLLECTIVE:
            raise DoolyError(f"{g.op} is a collective; collectives are not profiled yet (tensor parallelism)")
        if kind == STATEFUL and g.op.endswith("attention_with_output"):
            p = predictor.attention(g.signature, batch, model_name=trace.model, op=g.op)
        else:
            p = predictor.latency(g.signature, values, model_name=trace.model, op=g.op)
        total += g.count * p.us
        by_kind[kind] += g.count * p.us
        var += (g.count * p.uncertainty_us) ** 2
        extrapolated |= p.extrapolated
    calibrated = False
    if overhead:
        from dooly.predict.overhead import OVERHEAD_SIG, overhead_point

        model = predictor.model(OVERHEAD_SIG)
        if model is not None:
            p = model.predict(overhead_point(trace, batch))
            by_kind["overhead"] = p.us
            total += p.us
            var += p.uncertainty_us ** 2
            calibrated = True
    return StepPrediction(total, math.sqrt(var), extrapolated, by_kind, calibrated)
