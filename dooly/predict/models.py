"""Regressors over one signature's measured points; stored as JSON, never pickled.

- `Curve`: one request variable. Exact at measured points, piecewise-linear between them, a
  least-squares line through the outermost three points beyond them (flagged as extrapolated).
- `Linear`: several request variables (e.g. num_tokens x num_reqs, or an attention batch). Exact at
  measured points; elsewhere non-negative least squares on features of the point, flagged as
  extrapolated outside the measured box.
Uncertainty: half the interquartile range of the measurements (interpolated), plus for `Curve` a
term growing towards the middle of a segment and with extrapolation distance, and for `Linear` the
RMS relative residual of the fit times the prediction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import numpy as np

from dooly.registry import registrar


@dataclass(frozen=True)
class Prediction:
    us: float  # predicted latency, microseconds
    uncertainty_us: float  # one-sigma-like band from measurement dispersion and distance to data
    extrapolated: bool  # outside the measured range of at least one request variable
    exact: bool  # the point itself was measured


class Curve:
    kind = "curve"

    @property
    def variables(self) -> list[str]:
        return [self.var]

    def __init__(self, var: str, xs, ys, iqr):
        order = np.argsort(xs)
        self.var = var
        self.xs = np.asarray(xs, float)[order]
        self.ys = np.asarray(ys, float)[order]
        self.iqr = np.asarray(iqr, float)[order]
        k = min(3, len(self.xs))
        self.hi = _line(self.xs[-k:], self.ys[-k:])
        self.lo = _line(self.xs[:k], self.ys[:k])

    def predict(self, point: dict[str, int]) -> Prediction:
        x = float(point.get(self.var, 0))
        xs, ys = self.xs, self.ys
        hit = np.nonzero(xs == x)[0]
        if hit.size:
            i = hit[0]
            return Prediction(float(ys[i]), float(self.iqr[i] / 2), False, True)
        if len(xs) == 1:
            return Prediction(float(ys[0]), float(ys[0]), True, False)
        if xs[0] < x < xs[-1]:
            j = int(np.searchsorted(xs, x))
            t = (x - xs[j - 1]) / (xs[j] - xs[j - 1])
            y = ys[j - 1] + t * (ys[j] - ys[j - 1])
            band = (self.iqr[j - 1] + t * (self.iqr[j] - self.iqr[j - 1])) / 2
            band += 0.25 * abs(ys[j] - ys[j - 1]) * 4 * t * (1 - t)  # largest mid-segment
            return Prediction(float(y), float(band), False, False)
        a, b = self.hi if x > xs[-1] else self.lo
        edge = -1 if x > xs[-1] else 0
        y = max(a + b * x, 0.0) if x > xs[-1] else max(a + b * x, 0.5 * ys[0])
        band = self.iqr[edge] / 2 + 0.2 * abs(y - ys[edge])
        return Prediction(float(y), float(band), True, False)

    def to_json(self) -> dict:
        return {"kind": self.kind, "var": self.var, "xs": self.xs.tolist(), "ys": self.ys.tolist(),
                "iqr": self.iqr.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> "Curve":
        return cls(d["var"], d["xs"], d["ys"], d["iqr"])


def _line(x, y) -> tuple[float, float]:
    if len(x) == 1:
        return float(y[0]), 0.0
    b, a = np.polyfit(x, y, 1)
    return float(a), float(max(b, 0.0))


# feature sets for several request variables: name -> (features(point) -> list[float])
FEATURES: dict[str, Callable[[dict], list[float]]] = {}


feature_set = registrar(FEATURES, "feature set")


@feature_set("poly2")
def _poly2(p: dict) -> list[float]:
    """1, each variable, each pairwise product (a GEMM over num_tokens x num_reqs, ...)."""
    names = sorted(p)
    out = [1.0] + [float(p[n]) for n in names]
    out += [float(p[a]) * float(p[b]) for i, a in enumerate(names) for b in names[i:]]
    return out


def attention_work(batch) -> list[float]:
    """Attention work of any batch (a `Batch`): 1, requests, KV tokens read by decoding requests,
    prefill tokens, and prefill tokens x the tokens each attends to (causal: context + half the chunk)."""
    reqs = len(batch.query_lens)
    kv = sum(c + 1 for c, q in zip(batch.context_lens, batch.query_lens) if q == 1)
    pre = sum(q for q in batch.query_lens if q > 1)
    work = sum(q * (c + (q + 1) / 2) for c, q in zip(batch.context_lens, batch.query_lens) if q > 1)
    return [1.0, float(reqs), float(kv), float(pre), float(work)]


@feature_set("attention")
def _attention(p: dict) -> list[float]:
    """Grid points of attention (dec_reqs, dec_kv, pre_chunk, pre_ctx) as the batch they stand for."""
    from dooly.profile.batches import batch_of

    return attention_work(batch_of(p))


class Linear:
    kind = "linear"

    def __init__(self, features: str, points: list[dict], ys, iqr, weights=None, rel_rms=None, counts=None):
        self.features = features
        self.points = [dict(p) for p in points]
        self.ys = np.asarray(ys, float)
        self.iqr = np.asarray(iqr, float)
        self.lo = {k: min(p.get(k, 0) for p in points) for k in set().union(*points)}
        self.hi = {k: max(p.get(k, 0) for p in points) for k in set().union(*points)}
        if weights is None:
            X = np.array([FEATURES[features](p) for p in points])
            # relative error matters: weight each point by 1/|y| (floored, residual fits may cross 0)
            # (an overhead residual is a difference of two step times and crosses 0: floor at its median)
            floor = float(np.median(np.abs(self.ys))) if features == "overhead" else 1e-3 * float(np.abs(self.ys).max())
            scale = np.maximum(np.abs(self.ys), floor + 1e-9)
            if counts is not None:  # a point that is the median of n samples counts sqrt(n) times as much
                scale = scale / np.sqrt(np.maximum(np.asarray(counts, float), 1.0))
            from scipy.optimize import nnls  # fitting only: predicting from stored fits needs numpy alone

            weights, _ = nnls(X / scale[:, None], self.ys / scale)
            fit = X @ weights
            rel_rms = float(np.sqrt(np.mean(((fit - self.ys) / scale) ** 2)))
        self.weights = np.asarray(weights, float)
        self.rel_rms = float(rel_rms)
        self._index = {json.dumps(p, sort_keys=True): i for i, p in enumerate(self.points)}
        self._band0 = float(np.median(self.iqr) / 2) if len(self.iqr) else 0.0

    @property
    def variables(self) -> list[str]:
        return sorted(self.lo)

    def predict(self, point: dict[str, int]) -> Prediction:
        i = self._index.get(json.dumps(point, sort_keys=True))
        if i is not None:
            return Prediction(float(self.ys[i]), float(self.iqr[i] / 2), False, True)
        out = any(point.get(k, 0) < self.lo.get(k, 0) or point.get(k, 0) > self.hi.get(k, 0) for k in point)
        return self.predict_features(FEATURES[self.features](point), out)

    def smooth(self, point: dict[str, int]) -> Prediction:
        """The fitted surface at `point`, even where a measurement exists (for noisy residual data)."""
        out = any(point.get(k, 0) < self.lo.get(k, 0) or point.get(k, 0) > self.hi.get(k, 0) for k in point)
        return self.predict_features(FEATURES[self.features](point), out)

    def predict_features(self, features: list[float], extrapolated: bool) -> Prediction:
        """Prediction for a feature vector (e.g. `attention_work` of an arbitrary batch)."""
        y = float(np.dot(features, self.weights))
        band = self._band0 + self.rel_rms * y
        return Prediction(max(y, 0.0), band * (2 if extrapolated else 1), extrapolated, False)

    def to_json(self) -> dict:
        return {"kind": self.kind, "features": self.features, "points": self.points, "ys": self.ys.tolist(),
                "iqr": self.iqr.tolist(), "weights": self.weights.tolist(), "rel_rms": self.rel_rms}

    @classmethod
    def from_json(cls, d: dict) -> "Linear":
        return cls(d["features"], d["points"], d["ys"], d["iqr"], d["weights"], d["rel_rms"])


@feature_set("overhead")
def _overhead(p: dict) -> list[float]:
    """Per-step engine overhead: constant, per dispatched op, per request, per token."""
    return [1.0, float(p.get("num_ops", 0)), float(p.get("num_reqs", 0)), float(p.get("num_tokens", 0))]


ATTENTION_VARS = {"dec_reqs", "dec_kv", "pre_chunk", "pre_ctx"}
OVERHEAD_VARS = {"num_ops", "num_reqs", "num_tokens"}


def fit(points: list[dict], ys, iqr, features: str | None = None, counts=None):
    """The regressor for one signature's measurements (`counts`: samples behind each point, used to
    weight the engine-overhead fit, whose points are medians of very different numbers of steps)."""
    variables = sorted(set().union(*points)) if points else []
    if features is None and variables and set(variables) <= ATTENTION_VARS:
        features = "attention"
    if features is None and "num_ops" in variables and set(variables) <= OVERHEAD_VARS:
        features = "overhead"
    if len(variables) <= 1 and features is None:
        var = variables[0] if variables else "_"
        return Curve(var, [p.get(var, 0) for p in points], ys, iqr)
    features = features or "poly2"
    return Linear(features, points, ys, iqr, counts=counts if features == "overhead" else None)


def from_json(d: dict):
    return {"curve": Curve, "linear": Linear}[d["kind"]].from_json(d)
