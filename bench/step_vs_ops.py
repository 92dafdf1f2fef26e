"""Accuracy of the profiles: a whole real engine step vs the sum predicted from the database.

For one small real model (default Qwen/Qwen2.5-0.5B, random weights), per available attention backend:
- vllm / CPU_ATTN: the real engine (in-process, eager, the worker's 1 OpenMP thread) runs a prefill
  step of N tokens and a decode step of B requests, timed around the model's forward + logits
  (median of 7 after 2 warm-up repetitions); its attention layers are timed inside the same steps.
  Predicted: the model is profiled (`dooly profile`, reduced grid) into a fresh database, and the
  step's latency is predicted from it (`predict_step`: every op's regressor at the step's
  num_tokens / num_reqs, attention at the step's batch composition, times its count per step).
- hf / sdpa, eager and flex_attention: the HF model's forward for a prefill (batch 1, N tokens) and a decode step
  (B sequences, one new token over a KV cache of N tokens), under no_grad as generate() runs it;
  predicted: every op of the traced phase from the database (attention is plain aten ops there).
(The paged variant, paged|sdpa / paged|eager, runs under transformers' continuous-batching manager,
not a plain forward; its ops are profiled and tested, but no whole-step row is printed here.)
Printed per backend and step: measured, predicted, ratio; for vLLM also the stateless-only ratio
(vs forward minus attention) and attention's measured vs predicted time, so each part's error shows.
Run: .venv/bin/python bench/step_vs_ops.py [MODEL] [PREFILL_TOKENS] [DECODE_BATCH]
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def engine_steps(llm, prompt_len: int, batch: int, reps: int = 7):
    from vllm import SamplingParams

    from dooly.engines.vllm.engine import time_engine_model

    eng = llm.llm_engine
    pre, dec = [], []
    for rep in range(reps + 2):  # the first two repetitions are warm-up
        sp = SamplingParams(max_tokens=4, min_tokens=4, ignore_eos=True, temperature=0)
        eng.add_request(f"p{rep}", {"prompt_token_ids": [1 + (i % 500) for i in range(prompt_len)]}, sp)
        with time_engine_model(llm) as steps:
            eng.step()  # prefill of prompt_len tokens
        while eng.has_unfinished_requests():
            eng.step()
        for b in range(batch):
            eng.add_request(f"d{rep}-{b}", {"prompt_token_ids": [1 + b] * (prompt_len - 1)}, sp)
        eng.step()  # prefill of the batch
        with time_engine_model(llm) as dsteps:
            eng.step()  # decode: batch tokens, batch requests, KV length prompt_len each
        while eng.has_unfinished_requests():
            eng.step()
        if rep >= 2:
            pre.append(steps[0])
            dec.append(dsteps[0])
    return pre, dec


def profile_into(url, spec, engine, backend=None):
    """Profile `spec` (reduced grid) into the database at `url`; the Predictor for it."""
    import subprocess

    from dooly.db import LatencyDB
    from dooly.engines import get_engine
    from dooly.predict import Predictor
    from dooly.profile import current_environment, default_threads

    cmd = [sys.executable, "-m", "dooly.cli", "profile", spec.name, "--engine", engine, "--grid", "reduced",
           "--db", url] + (["--attention-backend", backend] if backend else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"profile failed: {r.stderr.strip().splitlines()[-1]}")
    failed = [line for line in r.stdout.splitlines() if line.startswith("could not replay")]
    for line in failed:
        print(f"  {line}")
    env = current_environment(engine, get_engine(engine).version(), "bfloat16", default_threads())
    return Predictor(LatencyDB(url, create=False), env)


def phase_sum_s(trace, predictor, values, phase):
    """Predicted seconds of one HF phase: every non-metadata op's regressor times its count."""
    from dooly.records import FREE, classify

    total = 0.0
    for g in trace.groups():
        if g.phase == phase and classify(g.op, g.attrs) != FREE:
            total += g.count * predictor.latency(g.signature, values, model_name=trace.model, op=g.op).us / 1e6
    return total


def vllm_rows(spec, n_tok, batch, url):
    from dooly.engines.vllm.engine import start_engine
    from dooly.predict import predict_step
    from dooly.records import Batch
    from dooly.trace import trace_model

    trace = trace_model(spec)
    llm = start_engine(spec.config)
    pre, dec = engine_steps(llm, n_tok, batch)
    del llm
    predictor = profile_into(url, spec, "vllm")
    for name, steps, b in (("prefill", pre, Batch((0,), (n_tok,))),
                           ("decode", dec, Batch((n_tok - 1,) * batch, (1,) * batch))):
        fwd = statistics.median(s["forward_s"] for s in steps)
        att = statistics.median(s["attention_s"] for s in steps)
        spread = (max(s["forward_s"] for s in steps) - min(s["forward_s"] for s in steps)) / fwd
        step = predict_step(trace, predictor, b)
        free, state = step.by_kind["stateless"] / 1e6, step.by_kind["stateful"] / 1e6
        print(f"vllm/CPU_ATTN {name:8s} measured {1e3 * fwd:8.2f} ms (spread {100 * spread:.1f}%)  "
              f"predicted {1e3 * (free + state):8.2f} ms  ratio {(free + state) / fwd:.3f} | stateless "
              f"{1e3 * free:.2f} vs {1e3 * (fwd - att):.2f} ms ({free / (fwd - att):.3f}) | attention layers "
              f"{1e3 * state:.2f} vs {1e3 * att:.2f} ms ({state / att:.3f})")


def hf_rows(spec, backend, n_tok, batch, url, reps=7):
    import torch
    from transformers import AutoModelForCausalLM

    from dooly.engines.hf.tracer import build_config
    from dooly.trace import trace_model

    trace = trace_model(spec, engine="hf", attention_backend=backend)
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_config(build_config(spec.config), attn_implementation=backend,
                                             dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (1, n_tok))
    dids = torch.randint(0, 1000, (batch, n_tok))
    times = {"prefill": [], "decode": []}
    with torch.no_grad():
        for rep in range(reps + 2):
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=True)
            t1 = time.perf_counter()
            cache = model(input_ids=dids, use_cache=True).past_key_values
            t2 = time.perf_counter()
            model(input_ids=dids[:, :1], past_key_values=cache, use_cache=True)
            t3 = time.perf_counter()
            if rep >= 2:
                times["prefill"].append(t1 - t0)
                times["decode"].append(t3 - t2)
    del model
    predictor = profile_into(url, spec, "hf", backend)
    for phase, values in (("prefill", {"batch_size": 1, "seq_len": n_tok, "past_len": 0}),
                          ("decode", {"batch_size": batch, "seq_len": 1, "past_len": n_tok})):
        m = statistics.median(times[phase])
        spread = (max(times[phase]) - min(times[phase])) / m
        free = phase_sum_s(trace, predictor, values, phase)
        print(f"hf/{backend:10s} {phase:8s} measured {1e3 * m:8.2f} ms (spread {100 * spread:.1f}%)  "
              f"predicted {1e3 * free:8.2f} ms  ratio {free / m:.3f}")


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "Qwen/Qwen2.5-0.5B"
    n_tok = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    from dooly.catalog import resolve
    from dooly.engine_interface import available

    spec = resolve(model)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"machine: {platform.node()} | {cpu} | {os.cpu_count()} cores | model {model} | prefill {n_tok} "
          f"tokens | decode batch {batch} at KV {n_tok}")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/latency.db"
        if available("vllm"):  # vLLM is optional: the HF rows run without it
            vllm_rows(spec, n_tok, batch, url)
        else:
            print("vllm: not installed here, its rows are skipped")
        for backend in ("sdpa", "eager", "flex_attention"):
            try:
                hf_rows(spec, backend, n_tok, batch, url)
            except Exception as e:  # one backend failing must not hide the others' rows
                print(f"hf/{backend:10s} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


if __name__ == "__main__":
    main()
