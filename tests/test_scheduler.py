"""vLLM's own scheduler driven in virtual time makes the engine's batching decisions."""

from __future__ import annotations

import pytest

from dooly.sim.core import RequestSpec, prompt_ids, simulate

LIMITS = {"max_num_batched_tokens": 256, "max_num_seqs": 4, "max_model_len": 1408}


@pytest.fixture(scope="module")
def small_engine(tiny_llama):
    """A real engine with a 256-token step budget, 4 sequences and only 12 KV blocks (preemption)."""
    from dooly.engines.vllm.engine import start_engine

    llm = start_engine(tiny_llama.config, num_gpu_blocks_override=12, enable_prefix_caching=False, **LIMITS)
    yield llm
    del llm


def _real_schedule(llm, specs, vocab):
    from vllm import SamplingParams

    eng = llm.llm_engine
    sched = eng.engine_core.engine_core.scheduler
    schedule = sched.schedule
    log = []

    def recording(*args, **kwargs):
        out = schedule(*args, **kwargs)
        log.append(dict(out.num_scheduled_tokens))
        return out

    sched.schedule = recording
    try:
        for i, r in enumerate(specs):
            sp = SamplingParams(max_tokens=r.output_tokens, min_tokens=r.output_tokens, ignore_eos=True,
                                temperature=0)
            eng.add_request(r.request_id, {"prompt_token_ids": prompt_ids(i, r.prompt_tokens, vocab)}, sp)
        while eng.has_unfinished_requests():
            eng.step()
    finally:
        del sched.schedule
    # request ids may carry an engine-internal suffix: keep the caller's part
    return [{k.split("-")[0]: n for k, n in step.items()} for step in log if step]


def _simulated_schedule(tiny_llama, llm, specs, vocab):
    from dooly.engines.vllm.scheduler import VllmScheduler

    blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    sched = VllmScheduler(tiny_llama.config, num_blocks=blocks, enable_prefix_caching=False, **LIMITS)
    _, steps = simulate(specs, sched, lambda batch: 0.01, vocab)
    return [dict(zip(s.req_ids, s.batch.query_lens)) for s in steps], steps


def test_chunked_prefill_and_preemption_match_the_engine(tiny_llama, small_engine):
    vocab = tiny_llama.config["vocab_size"]
    # long prompts chunked over several 256-token steps while others decode; 12 blocks of 128 tokens
    # cannot hold all of them at once: the scheduler must preempt
    specs = [RequestSpec(str(i), 0.0, p, o) for i, (p, o) in
             enumerate([(600, 40), (90, 60), (300, 50), (200, 80), (700, 30), (150, 90)])]
    real = _real_schedule(small_engine, specs, vocab)
    sim, steps = _simulated_schedule(tiny_llama, small_engine, specs, vocab)
    assert len(real) > 20
    assert any(n > 1 for step in real for n in step.values()) and any(len(step) > 1 for step in real)
    assert any(s.preempted for s in steps), "the workload was meant to force a preemption"
    for i, (r, s) in enumerate(zip(real, sim)):
        assert r == s, f"step {i}: engine scheduled {r}, simulation {s}"
    assert len(real) == len(sim)
