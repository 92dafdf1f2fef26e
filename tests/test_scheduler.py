"""vLLM's own scheduler driven in virtual time makes the engine's batching decisions."""

from __future__ import annotations

import pytest

from dooly.sim.core import RequestSpec, simulate

LIMITS = {"max_num_batched_tokens": 256, "max_num_seqs": 4, "max_model_len": 1408}


@pytest.fixture(scope="module")
def small_engine(tiny_llama):
    """A real engine with a 256-token step budget, 4 sequences and only 12 KV blocks (preemption)."""
    from dooly.engines.vllm.engine import running_engine

    with running_engine(tiny_llama.config, num_gpu_blocks_override=12, enable_prefix_caching=False, **LIMITS) as llm:
        yield llm


def _simulated_schedule(tiny_llama, llm, specs, vocab):
    from dooly.engines.vllm.scheduler import VllmScheduler

    blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    sched = VllmScheduler(tiny_llama.config, num_blocks=blocks, enable_prefix_caching=False, **LIMITS)
    _, steps = simulate(specs, sched, lambda batch: 0.01, vocab)
    return [s.batch for s in steps], steps


def test_chunked_prefill_and_preemption_match_the_engine(tiny_llama, small_engine):
    vocab = tiny_llama.config["vocab_size"]
    # long prompts chunked over several 256-token steps while others decode; 12 blocks of 128 tokens
    # cannot hold all of them at once: the scheduler must preempt
    specs = [RequestSpec(str(i), 0.0, p, o) for i, (p, o) in
             enumerate([(600, 40), (90, 60), (300, 50), (200, 80), (700, 30), (150, 90)])]
    from dooly.engines.vllm.engine import record_engine_steps

    # per step: each scheduled request's tokens already computed and tokens computed now
    real = [batch for batch, _ in record_engine_steps(small_engine, specs, vocab)]
    sim, steps = _simulated_schedule(tiny_llama, small_engine, specs, vocab)
    assert len(real) > 20
    assert any(q > 1 for b in real for q in b.query_lens) and any(len(b.query_lens) > 1 for b in real)
    assert any(s.preempted for s in steps), "the workload was meant to force a preemption"
    for i, (r, s) in enumerate(zip(real, sim)):
        assert r == s, f"step {i}: engine scheduled {r}, simulation {s}"
    assert len(real) == len(sim)
