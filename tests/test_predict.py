"""Predictors over the latency database, and step latency composed from a traced step."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dooly.errors import DoolyError
from dooly.predict.models import Curve, Linear, attention_work, fit, from_json
from dooly.profile.batches import batch_of
from dooly.records import Batch


def test_curve_exact_interpolated_extrapolated():
    # y = 10 + 2x measured at 1, 16, 128 (IQR 1 us everywhere)
    c = fit([{"num_tokens": x} for x in (1, 16, 128)], [12, 42, 266], [1, 1, 1])
    assert isinstance(c, Curve)
    at = c.predict({"num_tokens": 16})
    assert at.exact and not at.extrapolated and at.us == 42 and at.uncertainty_us == 0.5
    mid = c.predict({"num_tokens": 72})  # 42 + (72-16)/(128-16) * (266-42) = 154
    assert not mid.exact and not mid.extrapolated and mid.us == pytest.approx(154)
    assert mid.uncertainty_us > at.uncertainty_us  # farther from data: wider band
    out = c.predict({"num_tokens": 512})  # line through the 3 points: ~10 + 2*512
    assert out.extrapolated and out.us == pytest.approx(1034, rel=0.01)
    again = from_json(json.loads(json.dumps(c.to_json())))
    assert again.predict({"num_tokens": 72}) == mid


def test_attention_model_recovers_a_linear_cost():
    # synthetic attention cost: 5 + 2/request + 0.01 per KV token read + 0.002 per prefill token pair
    truth = np.array([5.0, 2.0, 0.01, 0.0, 0.002])
    pts = [{"dec_reqs": b, "dec_kv": kv} for b in (1, 8, 64) for kv in (128, 1024, 4096)]
    pts += [{"pre_chunk": c, "pre_ctx": p} for c in (16, 128, 512) for p in (0, 1024)]
    ys = [float(np.dot(attention_work(batch_of(p)), truth)) for p in pts]
    m = fit(pts, ys, [0.1] * len(pts))
    assert isinstance(m, Linear) and m.features == "attention"
    batch = Batch((700, 900, 0), (1, 1, 200))  # a mixed batch never measured as such
    expect = float(np.dot(attention_work(batch), truth))
    got = m.predict_features(attention_work(batch), False)
    assert got.us == pytest.approx(expect, rel=1e-3) and not got.exact
    assert m.predict(pts[4]).exact and m.predict(pts[4]).us == ys[4]
    assert m.predict({"dec_reqs": 128, "dec_kv": 128}).extrapolated


def test_fits_are_stored_as_json_and_refit_when_data_changes(profiled, tiny_llama_trace):
    from dooly.db import Measurement
    from dooly.engines.vllm.kernels import GEMM_OPS
    from dooly.predict import Predictor

    db, env = profiled
    sig = next(o.signature for o in tiny_llama_trace.ops
               if o.op in GEMM_OPS and o.module.endswith("gate_up_proj"))
    predictor = Predictor(db, env)
    predictor.latency(sig, {"num_tokens": 64})
    assert db.fit(env.key, sig) is None  # cached only once the prediction succeeded
    predictor.save_fits()
    digest, model = db.fit(env.key, sig)
    assert json.loads(model)["kind"] == "curve"
    predictor = Predictor(db, env)
    predictor.latency(sig, {"num_tokens": 64})
    assert not predictor._unsaved  # same data: the stored fit is reused
    db.add_measurement(env.key, Measurement(sig, "num_tokens=64", 1.0, 1.0, 1.0, 5, 0.1), None)
    predictor = Predictor(db, env)
    predictor.latency(sig, {"num_tokens": 64})
    predictor.save_fits()
    assert db.fit(env.key, sig)[0] != digest  # new point: refit


def test_step_latency_composes_stateless_and_attention(profiled, tiny_llama_trace):
    from dooly.predict import Predictor, predict_step

    db, env = profiled
    pred = Predictor(db, env)
    decode = predict_step(tiny_llama_trace, pred, Batch((100,) * 4, (1,) * 4))
    mixed = predict_step(tiny_llama_trace, pred, Batch((100,) * 4 + (0,), (1,) * 4 + (64,)))
    assert decode.by_kind["stateless"] > 0 and decode.by_kind["stateful"] > 0
    assert mixed.us > decode.us  # 64 more tokens of prefill cost time
    assert decode.us == pytest.approx(sum(decode.by_kind.values()))


def test_missing_signature_names_model_and_command(profiled):
    from dooly.catalog import resolve
    from dooly.predict import Predictor, predict_step
    from dooly.trace import trace_model

    db, env = profiled
    other = trace_model(resolve("dooly/tiny-qwen2"))
    with pytest.raises(DoolyError, match=r"of dooly/tiny-qwen2 .*dooly profile dooly/tiny-qwen2 --db sqlite"):
        predict_step(other, Predictor(db, env), Batch((0,), (16,)))


def test_calibration_stores_ratios_and_overhead_and_steps_include_them(profiled_copy, tiny_llama_trace):
    from dooly.api import calibrate
    from dooly.db import LatencyDB
    from dooly.predict import Predictor, predict_step
    from dooly.predict.in_engine import InEngineRatios
    from dooly.predict.overhead import OVERHEAD_SIG

    db, env = profiled_copy  # the profiled tiny Llama, calibrated apart
    url = db.url
    samples = calibrate(url, models=("dooly/tiny-llama",))
    assert len(samples) > 10 and (samples["measured_us"] > 0).all()
    curves = samples.attrs["in_engine"]
    assert {"gemm", "attention", "kv_write", "elementwise"} <= set(curves)
    assert all(0.1 < ratio < 10 and steps >= 3 for c in curves.values() for _, ratio, _, _, steps, _ in c)
    db = LatencyDB(url, create=False)
    stored = db.points(env.key, OVERHEAD_SIG)
    assert stored and all(m.signature == OVERHEAD_SIG for m in stored.values())
    batch = Batch((50,) * 3, (1,) * 3)
    step = predict_step(tiny_llama_trace, Predictor(db, env), batch)
    bare = predict_step(tiny_llama_trace, Predictor(db, env), batch, overhead=False)
    raw = predict_step(tiny_llama_trace, Predictor(db, env), batch, overhead=False, in_engine=False)
    assert step.calibrated and step.in_engine and not bare.calibrated and not raw.in_engine
    assert step.us == pytest.approx(bare.us + step.by_kind["overhead"])
    ratios = InEngineRatios.load(db, env.key)
    for family, us in raw.by_family.items():  # each family scaled by its ratio at the step's size
        assert bare.by_family[family] == pytest.approx(us * ratios(family, batch.num_tokens))
    # calibrating again replaces the overhead points rather than adding to them
    again = calibrate(url, models=("dooly/tiny-llama",), seed=1)
    distinct = again[["num_ops", "num_reqs", "num_tokens"]].drop_duplicates()
    assert len(db.points(env.key, OVERHEAD_SIG)) == len(distinct)


def test_calibration_needs_its_models_profiled(tmp_path, profiled_copy):
    from dooly.api import calibrate

    db, env = profiled_copy
    url = db.url
    before = db.points(env.key)
    with pytest.raises(DoolyError, match=rf"dooly/tiny-qwen2 measured .*: dooly profile dooly/tiny-qwen2 --db {url}$"):
        calibrate(url, models=("dooly/tiny-qwen2",))
    with pytest.raises(DoolyError, match=r"--tp 2 --db"):
        calibrate(url, models=("dooly/tiny-llama",), tensor_parallel_size=2)
    assert db.points(env.key) == before
    with pytest.raises(DoolyError, match="no database at .*run `dooly profile` first"):
        calibrate(f"sqlite:///{tmp_path / 'none.db'}", models=("dooly/tiny-llama",))
    assert not (tmp_path / "none.db").exists()
