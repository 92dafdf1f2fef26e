"""Latency of any signature at any point, from the database's measurements.

Fits are stored beside the data (JSON) with the hash of the points they were made from, and reused
until that data changes.
"""

from __future__ import annotations

import hashlib
import json

from dooly.db import Environment, LatencyDB, parse_point
from dooly.errors import DoolyError
from dooly.predict.models import Linear, Prediction, attention_work, fit, from_json


FIT_VERSION = 3  # bump when fitting changes: stored fits of the same data are then redone


class Predictor:
    def __init__(self, db: LatencyDB, env: Environment):
        self.db = db
        self.env = env
        self.env_key = db.require_environment(env)
        self._models: dict[str, object] = {}
        self._att: dict[str, tuple] = {}
        self._unsaved: dict[str, tuple[str, str]] = {}  # signature -> (data hash, model JSON) fitted here

    def model(self, signature: str):
        """The regressor for `signature`, or None when the database has no point of it."""
        if signature in self._models:
            return self._models[signature]
        pts = sorted(self.db.points(self.env_key, signature).values(), key=lambda m: m.point)
        if not pts:
            return None
        digest = hashlib.sha1(json.dumps([FIT_VERSION, [(m.point, m.median_us, m.p25_us, m.p75_us) for m in pts]])
                              .encode()).hexdigest()
        stored = self.db.fit(self.env_key, signature)
        if stored is not None and stored[0] == digest:
            model = from_json(json.loads(stored[1]))
        else:
            model = fit([parse_point(m.point) for m in pts], [m.median_us for m in pts],
                        [m.p75_us - m.p25_us for m in pts], counts=[m.repeats for m in pts])
            self._unsaved[signature] = (digest, json.dumps(model.to_json()))
        self._models[signature] = model
        return model

    def save_fits(self) -> None:
        """Cache in the database the regressors fitted since the last save. Called once a prediction
        has succeeded: a simulation that fails leaves the database as it found it."""
        for signature, (digest, model_json) in self._unsaved.items():
            self.db.put_fit(self.env_key, signature, digest, model_json)
        self._unsaved.clear()

    def latency(self, signature: str, values: dict, *, model_name: str = "", op: str = "") -> Prediction:
        """Latency at request-variable values (extra variables the signature ignores are dropped)."""
        m = self._require(signature, model_name, op)
        return m.predict({k: values[k] for k in m.variables if k in values})

    def attention(self, signature: str, batch, *, model_name: str = "", op: str = "") -> Prediction:
        """Latency of a stateful attention signature for an arbitrary batch composition."""
        m = self._require(signature, model_name, op)
        if not isinstance(m, Linear) or m.features != "attention":
            return m.predict({"num_tokens": batch.num_tokens})
        index, top = self._attention_index(signature, m)
        i = index.get(batch)
        if i is not None:  # a measured composition: the measurement itself
            return Prediction(float(m.ys[i]), float(m.iqr[i] / 2), False, True)
        work = attention_work(batch)
        return m.predict_features(work, any(w > t for w, t in zip(work, top)))

    def _attention_index(self, signature: str, m: Linear):
        """Measured batch -> point index, and the largest measured value of each work feature."""
        hit = self._att.get(signature)
        if hit is None:
            from dooly.profile.batches import batch_of

            batches = [batch_of(p) for p in m.points]
            works = [attention_work(b) for b in batches]
            hit = ({b: i for i, b in enumerate(batches)}, [max(col) for col in zip(*works)])
            self._att[signature] = hit
        return hit

    def _require(self, signature: str, model_name: str, op: str, command=None):
        """The signature's regressor; a missing one fails naming `command()` (the `dooly profile` call
        that fills it; default: profile the model)."""
        m = self.model(signature)
        if m is None:
            what = f"{op} ({signature[:8]})" if op else signature
            who = f" of {model_name}" if model_name else ""
            fill = command() if command else f"dooly profile {model_name or 'MODEL'} --db {self.db.shown_url}"
            raise DoolyError(f"no measurements for {what}{who} in this environment; fill them with: {fill}")
        return m
