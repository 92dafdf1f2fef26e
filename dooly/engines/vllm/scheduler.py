"""vLLM's own V1 scheduler and KV-cache manager, driven in virtual time (no model, no worker).

Built as `EngineCore.__init__` builds it: the engine config `LLM(...)` would make, a KV-cache config
of `num_blocks` blocks of the model's attention spec, and `Scheduler(...)`; prefix caching gets
vLLM's block hasher. Each step: `schedule()`, then a model output with one sampled token for every
request past its prompt (none for a request mid-prefill chunk), then `update_from_output()`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from dooly.engines.vllm.setup import engine_config, write_model_dir
from dooly.records import DEFAULT_OPTIONS, Batch
from dooly.records import ScheduledStep


class VllmScheduler:
    def __init__(self, config: dict, dtype: str = "bfloat16", num_blocks: int | None = None, **engine_kwargs):
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.structured_output import StructuredOutputManager

        with tempfile.TemporaryDirectory(prefix="dooly-sched-") as tmp:
            self.cfg = cfg = engine_config(write_model_dir(config, Path(tmp)), dtype, **engine_kwargs)
        block = cfg.cache_config.block_size
        spec = kv_cache_spec(cfg, config)
        if num_blocks is None:  # what the engine gets from the default KV space (dooly's EngineOptions)
            per_block = spec.page_size_bytes * config["num_hidden_layers"]
            num_blocks = int(DEFAULT_OPTIONS.kv_cache_gib * (1 << 30) // per_block)
        self.num_blocks = num_blocks
        cfg.cache_config.num_gpu_blocks = num_blocks
        kvc = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                            kv_cache_groups=[KVCacheGroupSpec([f"model.layers.{i}.self_attn.attn"
                                                               for i in range(config["num_hidden_layers"])], spec)])
        self.sched = Scheduler(vllm_config=cfg, kv_cache_config=kvc, structured_output_manager=StructuredOutputManager(cfg),
                               block_size=block, hash_block_size=block, log_stats=False)
        self.block_hasher = None
        if cfg.cache_config.enable_prefix_caching:
            fn = get_hash_fn_by_name(cfg.cache_config.prefix_caching_hash_algo)
            init_none_hash(fn)
            self.block_hasher = get_request_block_hasher(block, fn)
        self.max_model_len = cfg.model_config.max_model_len

    def add(self, request_id: str, prompt_token_ids: list[int], output_tokens: int, arrival_s: float) -> None:
        from vllm import SamplingParams
        from vllm.v1.request import Request

        sp = SamplingParams(max_tokens=output_tokens, min_tokens=output_tokens, ignore_eos=True, temperature=0)
        self.sched.add_request(Request(request_id, prompt_token_ids, sp, None, arrival_time=arrival_s,
                                       block_hasher=self.block_hasher))

    def has_work(self) -> bool:
        return self.sched.has_requests()

    def step(self) -> ScheduledStep | None:
        """Schedule one step and complete it (one new token per request past its prompt)."""
        from vllm.v1.outputs import ModelRunnerOutput

        out = self.sched.schedule()
        ids = list(out.num_scheduled_tokens)
        if not ids:
            self.sched.update_from_output(out, ModelRunnerOutput(req_ids=[], req_id_to_index={}))
            return None
        reqs = self.sched.requests
        queries = [out.num_scheduled_tokens[r] for r in ids]
        # the scheduler has already advanced num_computed_tokens by this step's tokens
        contexts = [reqs[r].num_computed_tokens - q for r, q in zip(ids, queries)]
        before = {r: reqs[r].num_output_tokens for r in ids}
        sampled = [[] if reqs[r].is_prefill_chunk else [1] for r in ids]
        mro = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                sampled_token_ids=sampled)
        self.sched.update_from_output(out, mro)
        finished = [r for r in ids if r not in self.sched.requests or self.sched.requests[r].is_finished()]
        first = [r for r, s in zip(ids, sampled) if s and before[r] == 0]
        return ScheduledStep(Batch(tuple(contexts), tuple(queries)), ids, finished,
                             sorted(out.preempted_req_ids or ()), first)


def kv_cache_spec(cfg, config: dict):
    """One layer's KV-cache spec as vLLM's attention layer makes it: block size and KV storage dtype
    (the model's, or `kv_cache_dtype`) from the engine's own config."""
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    heads = config["num_attention_heads"]
    return FullAttentionSpec(block_size=cfg.cache_config.block_size,
                             num_kv_heads=config.get("num_key_value_heads") or heads,
                             head_size=config.get("head_dim") or config["hidden_size"] // heads,
                             dtype=kv_cache_dtype_str_to_dtype(cfg.cache_config.cache_dtype, cfg.model_config))


def resolve_scheduler_settings(config: dict, dtype: str, engine_kwargs: dict) -> dict:
    """The scheduling settings vLLM's engine config resolves for these options, as plain data
    (`dooly.deployment.scheduler_settings` caches them)."""
    with tempfile.TemporaryDirectory(prefix="dooly-sched-") as tmp:
        cfg = engine_config(write_model_dir(config, Path(tmp)), dtype, **engine_kwargs)
    sc, cc = cfg.scheduler_config, cfg.cache_config
    unsupported = {"scheduling policy": sc.policy != "fcfs", "async scheduling": bool(sc.async_scheduling),
                   "speculative decoding": cfg.speculative_config is not None,
                   "a KV connector": cfg.kv_transfer_config is not None, "LoRA": cfg.lora_config is not None,
                   "a custom scheduler class": sc.scheduler_cls not in (None, "vllm.v1.core.sched.scheduler.Scheduler"),
                   "a finer prefix-cache hash block": cc.hash_block_size not in (None, cc.block_size)}
    spec = kv_cache_spec(cfg, config)
    names = ("max_num_batched_tokens", "max_num_scheduled_tokens", "max_num_seqs", "max_num_active_seqs",
             "long_prefill_token_threshold", "long_prefill_token_threshold_adaptive", "enable_chunked_prefill",
             "scheduler_reserve_full_isl", "watermark")
    return {"block_size": cc.block_size, "max_model_len": cfg.model_config.max_model_len,
            "enable_prefix_caching": bool(cc.enable_prefix_caching), **{n: getattr(sc, n) for n in names},
            "kv_bytes_per_block": spec.page_size_bytes * config["num_hidden_layers"],
            "unsupported": [name for name, on in unsupported.items() if on]}
