"""The fast scheduler makes vLLM's scheduler's batches: same steps on the same arrivals."""

from __future__ import annotations

import random

import pytest

from dooly.sim.core import RequestSpec, simulate


class Prompted:
    """A scheduler fed given prompt token ids (shared prefixes, repeats) that keeps every step it made."""

    def __init__(self, sched, prompts: dict):
        self.sched, self.prompts, self.steps = sched, prompts, []

    def add(self, request_id, prompt_token_ids, output_tokens, arrival_s):
        self.sched.add(request_id, self.prompts[request_id], output_tokens, arrival_s)

    def has_work(self):
        return self.sched.has_work()

    def step(self):
        s = self.sched.step()
        if s is not None:
            self.steps.append(s)
        return s


def workload(seed: int, n: int, vocab: int, max_prompt: int, max_output: int):
    """A burst at t=0 then Poisson arrivals; prompts: fresh, a shared prefix + own suffix, or a repeat."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(2, vocab) for _ in range(rng.randrange(40, max_prompt // 2))] for _ in range(3)]
    specs, prompts, t = [], {}, 0.0
    for i in range(n):
        kind = rng.random()
        if kind < 0.4:
            prompt = rng.choice(prefixes) + [rng.randrange(2, vocab) for _ in range(rng.randrange(0, max_prompt // 3))]
        elif kind < 0.6 and prompts:
            prompt = list(prompts[rng.choice(sorted(prompts))])
        else:
            prompt = [rng.randrange(2, vocab) for _ in range(rng.randrange(1, max_prompt))]
        prompt = prompt[:max_prompt]
        if i >= n // 3:  # the rest arrive while the first third runs
            t += rng.expovariate(1 / 0.02)
        rid = f"r{i}"
        prompts[rid] = prompt
        specs.append(RequestSpec(rid, t, len(prompt), rng.randrange(1, max_output)))
    return specs, prompts


# (engine options, largest prompt, largest output, what the workload must exercise)
CONFIGS = {
    "preemption+prefix": (dict(block_size=16, num_blocks=48, max_num_batched_tokens=256, max_num_seqs=8,
                               max_model_len=1024), 600, 120, {"preempt", "hit"}),
    "preemption, no prefix caching": (dict(block_size=16, num_blocks=48, max_num_batched_tokens=256, max_num_seqs=8,
                                           max_model_len=1024, enable_prefix_caching=False), 600, 120, {"preempt"}),
    "no chunked prefill": (dict(block_size=16, num_blocks=160, max_num_batched_tokens=512, max_model_len=512,
                                enable_chunked_prefill=False), 480, 100, {"preempt", "hit", "capped"}),
    "small max_num_seqs and budget": (dict(block_size=16, num_blocks=200, max_num_batched_tokens=32, max_num_seqs=3,
                                           max_model_len=1024), 500, 60, {"chunk", "hit"}),
    "partial admission, long-prefill cap, watermark": (
        dict(block_size=16, num_blocks=56, max_num_batched_tokens=192, max_num_seqs=16, max_model_len=1024,
             scheduler_reserve_full_isl=False, long_prefill_token_threshold=64, watermark=0.05,
             max_num_scheduled_tokens=160), 600, 120, {"preempt", "hit", "chunk"}),
    "adaptive long-prefill cap": (dict(block_size=16, num_blocks=120, max_num_batched_tokens=256, max_num_seqs=32,
                                       long_prefill_token_threshold=24, long_prefill_token_threshold_adaptive=True,
                                       max_model_len=1024), 600, 120, {"hit", "chunk"}),
    "max_model_len cap": (dict(block_size=16, num_blocks=64, max_num_batched_tokens=256, max_num_seqs=8,
                               max_model_len=400), 390, 100, {"capped", "hit"}),
    "engine default blocks of 128": (dict(num_blocks=12, max_num_batched_tokens=256, max_num_seqs=4,
                                          max_model_len=1408), 700, 90, {"preempt", "hit"}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_scheduler_makes_vllms_steps(tiny_llama, name):
    from dooly.engines.vllm.scheduler import VllmScheduler
    from dooly.sim.scheduler import FastScheduler

    options, max_prompt, max_output, exercised = CONFIGS[name]
    vocab = tiny_llama.config["vocab_size"]
    latency = lambda b: 1e-3 * (1 + b.num_tokens / 100)  # noqa: E731
    seen = set()
    for seed in range(3):
        specs, prompts = workload(seed, 90, vocab, max_prompt, max_output)
        runs = []
        for cls in (VllmScheduler, FastScheduler):
            sched = Prompted(cls(tiny_llama.config, **options), prompts)
            results, steps = simulate(specs, sched, latency, vocab)
            runs.append((results, steps, sched.steps))
        (vres, vsteps, vraw), (fres, fsteps, fraw) = runs
        assert len(vraw) > len(specs)
        for i, (v, f) in enumerate(zip(vraw, fraw)):
            assert (f.req_ids, f.batch) == (v.req_ids, v.batch), f"seed {seed} step {i}"
            assert (f.preempted, f.finished, f.first_tokens) == (v.preempted, v.finished, v.first_tokens), \
                f"seed {seed} step {i}"
        assert len(fraw) == len(vraw)
        assert fsteps == vsteps and fres == vres
        max_len = sched.sched.max_model_len
        seen |= {"preempt"} if any(s.preempted for s in vraw) else set()
        seen |= {"chunk"} if any(c + q < len(prompts[r]) for s in vraw
                                 for r, c, q in zip(s.req_ids, s.batch.context_lens, s.batch.query_lens)) else set()
        first = {}
        for s in vraw:
            for r, c in zip(s.req_ids, s.batch.context_lens):
                first.setdefault(r, c)
        seen |= {"hit"} if any(c > 0 for c in first.values()) else set()
        seen |= {"capped"} if any(len(r.token_times) < r.output_tokens for r in vres) else set()
        assert all(len(r.token_times) == min(r.output_tokens, max_len - r.prompt_tokens) for r in vres)
    assert exercised <= seen, f"the workloads were meant to exercise {sorted(exercised - seen)}"


def test_watermark_applies_only_beside_running_requests(tiny_llama):
    from dooly.engines.vllm.scheduler import VllmScheduler
    from dooly.sim.scheduler import FastScheduler

    # 21 blocks of 16 tokens: 20 free (block 0 is the null block); watermark int(0.1 * 21) = 2 blocks.
    # r0's 300-token prompt needs ceil(300/16) = 19 blocks: admitted alone (19 <= 20), not if the
    # watermark applied (19 + 2 > 20). r1 (2 blocks + 2 watermark) waits until r0 frees its 20 blocks.
    options = dict(block_size=16, num_blocks=21, watermark=0.1, max_model_len=1024)
    specs = [RequestSpec("r0", 0.0, 300, 20), RequestSpec("r1", 0.005, 20, 5)]
    prompts = {"r0": list(range(2, 302)), "r1": list(range(500, 520))}
    vocab = tiny_llama.config["vocab_size"]
    runs = []
    for cls in (VllmScheduler, FastScheduler):
        sched = Prompted(cls(tiny_llama.config, **options), prompts)
        simulate(specs, sched, lambda b: 1e-3, vocab)
        runs.append(sched.steps)
    vllm, fast = runs
    assert vllm[0].req_ids == ["r0"] and vllm[0].batch.query_lens == (300,)
    assert all(s.req_ids == ["r0"] for s in vllm[:20]) and vllm[20].req_ids == ["r1"]
    assert fast == vllm


def test_unmodelled_options_are_refused(tiny_llama):
    from dooly.errors import DoolyError
    from dooly.sim.scheduler import FastScheduler

    with pytest.raises(DoolyError, match="scheduling policy"):
        FastScheduler(tiny_llama.config, num_blocks=64, scheduling_policy="priority")


def test_settings_are_vllms_resolution_cached_as_json(tiny_llama, tmp_path, monkeypatch):
    from dooly.engines.vllm.scheduler import VllmScheduler
    from dooly.sim.scheduler import scheduler_settings

    monkeypatch.setenv("DOOLY_CACHE", str(tmp_path))
    options = dict(block_size=16, max_num_batched_tokens=128, long_prefill_token_threshold=48)
    fresh = scheduler_settings(tiny_llama.config, **options)
    sc = VllmScheduler(tiny_llama.config, num_blocks=64, **options).cfg.scheduler_config
    # vLLM lowers max_num_seqs (default 256) to the 128-token budget
    assert (fresh["block_size"], fresh["max_num_batched_tokens"], fresh["long_prefill_token_threshold"]) == (16, 128, 48)
    assert fresh["max_num_seqs"] == sc.max_num_seqs == 128 and fresh["unsupported"] == []
    [entry] = (tmp_path / "schedulers").glob("*.json")
    entry.write_text(entry.read_text().replace('"block_size": 16', '"block_size": 99'))
    assert scheduler_settings(tiny_llama.config, **options)["block_size"] == 99  # served from the cache
    entry.write_text("{")
    assert scheduler_settings(tiny_llama.config, **options) == fresh  # unreadable: resolved and rewritten
    assert scheduler_settings(tiny_llama.config, **{**options, "block_size": 32})["block_size"] == 32


FACTORY = r"""
import json, sys
sys.modules["vllm"] = None  # the scheduling core must not need the engine
from dooly.sim.core import RequestSpec, simulate
from dooly.sim.scheduler import FastScheduler

settings = {"block_size": 16, "max_model_len": 512, "enable_prefix_caching": False, "max_num_batched_tokens": 64,
            "max_num_scheduled_tokens": None, "max_num_seqs": 2, "max_num_active_seqs": None,
            "long_prefill_token_threshold": 0, "long_prefill_token_threshold_adaptive": False,
            "enable_chunked_prefill": True, "scheduler_reserve_full_isl": False, "watermark": 0.0,
            "kv_bytes_per_block": 1, "unsupported": []}
sched = FastScheduler.from_settings(settings, num_blocks=64)
steps = []
class Keep:
    def add(self, *a): sched.add(*a)
    def has_work(self): return sched.has_work()
    def step(self):
        s = sched.step()
        if s is not None: steps.append(s)
        return s
reqs = [RequestSpec("a", 0.0, 100, 3), RequestSpec("b", 0.0, 10, 2), RequestSpec("c", 0.0, 5, 1)]
simulate(reqs, Keep(), lambda batch: 0.01, vocab=1000)
print(json.dumps([[list(s.batch.query_lens), list(s.req_ids)] for s in steps]))
"""


def test_scheduler_core_runs_from_settings_without_the_engine():
    """A CPU-only factory: settings in, the same chunked-prefill policy out, vLLM never imported."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", FACTORY], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    steps = json.loads(r.stdout.strip().splitlines()[-1])
    # 64-token budget, at most 2 running: a's 100-token prompt is chunked 64 + 36; b waits for the
    # second step's leftover budget (36 + 10 <= 64); c waits for a free slot (max_num_seqs = 2)
    assert steps[0] == [[64], ["a"]]
    assert steps[1] == [[36, 10], ["a", "b"]]
    assert all(len(ids) <= 2 for _, ids in steps)
    # every request got its prompt and then one token per step until its outputs are done
    assert sum(sum(q) for q, _ in steps) == (100 + 10 + 5) + (3 + 2 + 1) - 3
