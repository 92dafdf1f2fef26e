"""Latency of one engine step: the traced op list with the step's request variables substituted.

    step latency = sum over the trace's ops of count x predicted latency x in-engine ratio
                   (stateless: at num_tokens / num_reqs; attention: at the step's batch composition;
                    KV-cache write: at num_tokens; collectives: at num_tokens / num_reqs, as measured
                    between real ranks of the trace's tensor-parallel group; metadata-only ops: 0)
                 + the engine's calibrated per-step overhead (when the environment has one)

where an op's in-engine ratio is its family's (`dooly.predict.in_engine`) at the step's num_tokens, 1
when the environment is not calibrated.

`StepPredictor` resolves every op group's regressor once, then memoises the part that depends only
on (num_tokens, num_reqs), so a simulation pays per step for the attention terms alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dooly.engine_interface import get_engine
from dooly.errors import DoolyError
from dooly.predict.predictor import Predictor
from dooly.records import Batch
from dooly.records import COLLECTIVE, FREE, STATEFUL, STATELESS
from dooly.trace.records import Trace


@dataclass
class StepPrediction:
    us: float  # predicted latency of the step: its ops, plus the engine's calibrated per-step overhead
    uncertainty_us: float  # root-sum-square of the per-op bands (repeats of one op add linearly)
    extrapolated: bool  # some op was predicted outside its measured range
    by_kind: dict = field(default_factory=dict)  # stateless / stateful / collective / overhead -> us
    by_family: dict = field(default_factory=dict)  # gemm / attention / kv_write / elementwise / collective -> us
    calibrated: bool = False  # the environment's per-step overhead was known and included
    in_engine: bool = False  # op predictions were scaled by the environment's in-engine ratios


class StepPredictor:
    """Step latency of one traced model from one predictor, for any batch."""

    def __init__(self, trace: Trace, predictor: Predictor, overhead: bool = True, in_engine=True):
        if trace.engine != "vllm":
            raise DoolyError(f"step prediction needs a vLLM trace (one op list per step), got {trace.engine}")
        self.trace, self.predictor = trace, predictor
        eng = get_engine(trace.engine)
        self._by_counts: list = []  # (count, kind, family, signature, op) of ops that depend on the counts only
        self._attention: list = []  # (count, family, signature, op) of attention ops (depend on the batch)
        if trace.tensor_parallel_size > 1:
            self._check_group_size()
        for g in trace.groups():
            kind = eng.classify(g.op, g.attrs)
            if kind == FREE:
                continue
            if kind == COLLECTIVE:  # like a stateless op: its latency depends on the counts only
                self._require_collective(g.signature, g.op)
                self._by_counts.append((g.count, kind, eng.op_family(g.op), g.signature, g.op))
                continue
            if kind == STATEFUL and g.op == eng.attention_op:
                self._attention.append((g.count, eng.op_family(g.op), g.signature, g.op))
            else:
                self._by_counts.append((g.count, kind, eng.op_family(g.op), g.signature, g.op))
            predictor._require(g.signature, trace.model, g.op, self._profile_command)  # fails here, once
        # the in-engine/isolated ratio per op family: the environment's (True; None if not calibrated),
        # none (False), or these (an InEngineRatios)
        self._ratios = in_engine if not isinstance(in_engine, bool) else None
        if in_engine is True:
            from dooly.predict.in_engine import InEngineRatios, residency

            self._ratios = InEngineRatios.load(predictor.db, predictor.env_key, residency(trace, eng))
        self._overhead = None
        if overhead:
            from dooly.predict.overhead import OVERHEAD_SIG

            self._overhead = predictor.model(OVERHEAD_SIG)
        self._memo: dict[tuple[int, int], tuple] = {}
        self._ratio_memo: dict[tuple[str, int], float] = {}

    def _profile_command(self) -> str:
        return profile_command(self.trace, self.predictor.db.shown_url)

    def _check_group_size(self) -> None:
        """A rank's ops and its collectives were measured for one tensor-parallel degree: the trace's."""
        t, size = self.trace, self.trace.tensor_parallel_size
        if self.predictor.env.tensor_parallel_size != size:
            raise DoolyError(f"{t.model} is traced at tensor_parallel_size={size} but the predictor's environment "
                             f"is for {self.predictor.env.tensor_parallel_size}; predict with "
                             f"current_environment(..., {size}) after: {self._profile_command()}")

    def _require_collective(self, signature: str, op: str) -> None:
        if self.predictor.model(signature) is None:
            raise DoolyError(f"no measurements for the collective {op} ({signature[:8]}) of {self.trace.model} at "
                             f"tensor_parallel_size={self.trace.tensor_parallel_size} in this environment; "
                             f"fill them with: {self._profile_command()}")

    def _counts_part(self, num_tokens: int, num_reqs: int, batch: Batch) -> tuple:
        key = (num_tokens, num_reqs)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        values = {"num_tokens": num_tokens, "num_reqs": num_reqs}
        by_kind, by_family = {STATELESS: 0.0, STATEFUL: 0.0}, {}
        if any(kind == COLLECTIVE for _, kind, _, _, _ in self._by_counts):
            by_kind[COLLECTIVE] = 0.0
        var, extrapolated = 0.0, False
        for count, kind, family, sig, op in self._by_counts:
            p = self.predictor.latency(sig, values, model_name=self.trace.model, op=op)
            scale = count * self._ratio(family, num_tokens)
            by_kind[kind] += scale * p.us
            by_family[family] = by_family.get(family, 0.0) + scale * p.us
            var += (scale * p.uncertainty_us) ** 2
            extrapolated |= p.extrapolated
        if self._overhead is not None:
            from dooly.predict.overhead import overhead_point

            # always the fitted surface: per-point medians of the residual are single noisy steps
            p = self._overhead.smooth(overhead_point(self.trace, batch))
            by_kind["overhead"] = p.us
            var += p.uncertainty_us ** 2
        out = (by_kind, by_family, var, extrapolated)
        self._memo[key] = out
        return out

    def __call__(self, batch: Batch) -> StepPrediction:
        by_kind, by_family, var, extrapolated = self._counts_part(batch.num_tokens, len(batch.query_lens), batch)
        by_kind, by_family = dict(by_kind), dict(by_family)
        for count, family, sig, op in self._attention:
            p = self.predictor.attention(sig, batch, model_name=self.trace.model, op=op)
            scale = count * self._ratio(family, batch.num_tokens)
            by_kind[STATEFUL] += scale * p.us
            by_family[family] = by_family.get(family, 0.0) + scale * p.us
            var += (scale * p.uncertainty_us) ** 2
            extrapolated |= p.extrapolated
        return StepPrediction(sum(by_kind.values()), math.sqrt(var), extrapolated, by_kind, by_family,
                              self._overhead is not None, bool(self._ratios))

    def _ratio(self, family: str, num_tokens: int) -> float:
        if not self._ratios:
            return 1.0
        key = (family, num_tokens)  # attention asks every step: one interpolation per size
        hit = self._ratio_memo.get(key)
        if hit is None:
            hit = self._ratio_memo[key] = self._ratios(family, num_tokens)
        return hit


def predict_step(trace: Trace, predictor: Predictor, batch: Batch, overhead: bool = True,
                 in_engine: bool = True) -> StepPrediction:
    """One step's prediction (build a `StepPredictor` once to predict many steps)."""
    return StepPredictor(trace, predictor, overhead, in_engine)(batch)


def profile_command(t: Trace, db_url: str) -> str:
    """The `dooly profile` command that measures a model as traced (TP degree, KV-cache dtype)."""
    flags = ((f" --tp {t.tensor_parallel_size}" if t.tensor_parallel_size > 1 else "")
             + (f" --kv-cache-dtype {t.kv_cache_dtype}" if t.kv_cache_dtype else "")
             + (f" --quantization {t.quantization}" if t.quantization else ""))
    return f"dooly profile {t.model}{flags} --db {db_url}"
