"""vLLM V1's scheduling policy re-implemented compactly, for simulations too long to drive vLLM's own.

Scope: vLLM's `Scheduler.schedule()` / `update_from_output()`, `KVCacheManager` and `BlockPool` as
dooly configures them: one full-attention KV-cache group, FCFS, synchronous steps, no speculative
decoding, LoRA, multimodal inputs, structured output or KV connector. Settings come from the engine
config `VllmScheduler` builds; `tests/test_fast_scheduler.py` checks both make the same steps.

The model of one step (vLLM's):
1. Running requests, in queue order, each get min(tokens not yet computed, long-prefill cap, token
   budget, room below max_model_len). If the KV blocks those tokens need are not free, the last
   running request is preempted (recompute: blocks freed, computed tokens reset, put at the front
   of the waiting queue) until they are; a request that preempts itself ends the pass.
2. Only in a step without preemptions: waiting requests, first come first served, while the token
   budget and max_num_seqs allow. Each reuses its longest run of cached full blocks (never its
   last token) and is admitted if its whole sequence so far fits in the free blocks
   (scheduler_reserve_full_isl) and its chunk does; the first that does not fit ends the pass.
3. Every scheduled request whose computed tokens reach its length samples one token (id 1); at
   max_tokens outputs or max_model_len tokens it finishes and frees its blocks.

KV blocks: block 0 is the null block. vLLM's free queue is, in order, never-cached blocks (freed
ones are put in front; which one is reused is immaterial here) then cached blocks from least to
most recently freed (a request frees its blocks tail first). Allocation takes from the front,
evicting a cached block's hash; a prefix hit on a free cached block takes it out of the queue.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from dooly.deployment import kv_blocks, scheduler_settings
from dooly.errors import DoolyError
from dooly.records import DEFAULT_OPTIONS, Batch, ScheduledStep


class _Request:
    __slots__ = ("rid", "prompt", "num_prompt", "max_tokens", "num_tokens", "computed", "blocks",
                 "hashes", "num_cached")

    def __init__(self, rid: str, prompt: list[int], max_tokens: int):
        self.rid = rid
        self.prompt = prompt  # token ids; every output token is id 1
        self.num_prompt = len(prompt)
        self.max_tokens = max_tokens
        self.num_tokens = len(prompt)  # prompt + output tokens so far
        self.computed = 0  # tokens whose KV is computed (or scheduled this step)
        self.blocks: list[int] = []  # KV block ids, in token order
        self.hashes: list[int] = []  # chained hash of each full block's tokens, computed lazily
        self.num_cached = 0  # leading blocks registered in the prefix cache


class BlockPool:
    """KV blocks: reference counts, the free queue and the prefix cache (block hash -> blocks)."""

    def __init__(self, num_blocks: int):
        self.ref = [0] * num_blocks
        self.hash: list[int | None] = [None] * num_blocks
        self.plain = list(range(num_blocks - 1, 0, -1))  # free, never cached (block 0: the null block)
        self.lru: OrderedDict[int, None] = OrderedDict()  # free cached blocks, evicted first first
        self.cached: dict[int, list[int]] = {}  # block hash -> blocks holding it, the first one is hit

    @property
    def num_free(self) -> int:
        return len(self.plain) + len(self.lru)

    def take(self, n: int) -> list[int]:
        """n free blocks (the caller checked there are), referenced once; cached ones lose their hash."""
        plain, ref = self.plain, self.ref
        k = min(n, len(plain))
        out = plain[len(plain) - k:]
        del plain[len(plain) - k:]
        while len(out) < n:
            b = self.lru.popitem(last=False)[0]
            h = self.hash[b]
            holders = self.cached[h]
            holders.remove(b)
            if not holders:
                del self.cached[h]
            self.hash[b] = None
            out.append(b)
        for b in out:
            ref[b] = 1
        return out

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block, in eviction order (the first is evicted first)."""
        ref, hashes = self.ref, self.hash
        for b in blocks:
            ref[b] -= 1
            if ref[b] == 0:
                if hashes[b] is None:
                    self.plain.append(b)
                else:
                    self.lru[b] = None

    def touch(self, blocks: list[int]) -> None:
        ref, lru = self.ref, self.lru
        for b in blocks:
            if ref[b] == 0:
                del lru[b]
            ref[b] += 1

    def hit(self, hashes: list[int]) -> list[int]:
        """Blocks of the longest cached prefix of `hashes`."""
        out, cached = [], self.cached
        for h in hashes:
            holders = cached.get(h)
            if holders is None:
                break
            out.append(holders[0])
        return out

    def register(self, blocks: list[int], hashes: list[int], start: int, end: int) -> None:
        """Put blocks[start:end] (full, just written) in the prefix cache."""
        cached, block_hash = self.cached, self.hash
        for i in range(start, end):
            b, h = blocks[i], hashes[i]
            holders = cached.get(h)
            if holders is None:
                cached[h] = [b]
            elif b not in holders:
                holders.append(b)
            block_hash[b] = h


class FastScheduler:
    """Same protocol and `ScheduledStep`s as `VllmScheduler`, O(running requests) per step."""

    def __init__(self, config: dict, dtype: str = "bfloat16", num_blocks: int | None = None, **engine_kwargs):
        self._configure(scheduler_settings(config, dtype, **engine_kwargs), num_blocks)

    @classmethod
    def for_deployment(cls, deployment) -> "FastScheduler":
        """The scheduler of a resolved `Deployment`: its effective settings and KV blocks."""
        return cls.from_settings(deployment.settings, deployment.num_blocks)

    @classmethod
    def from_settings(cls, settings: dict, num_blocks: int | None = None) -> "FastScheduler":
        """A scheduler from plain settings (the dict `scheduler_settings` returns, or one written by
        hand in a test): no engine is imported."""
        sched = cls.__new__(cls)
        sched._configure(settings, num_blocks)
        return sched

    def _configure(self, st: dict, num_blocks: int | None) -> None:
        self.settings = st
        if st["unsupported"]:
            raise DoolyError(f"the fast scheduler does not model {', '.join(st['unsupported'])}; use scheduler='vllm'")
        self.block_size = st["block_size"]
        self.max_model_len = st["max_model_len"]
        self.max_batched = st["max_num_batched_tokens"]  # vLLM's input budget
        self.budget = min(st["max_num_scheduled_tokens"] or self.max_batched, self.max_batched)
        self.max_active = st["max_num_active_seqs"] or st["max_num_seqs"]
        self.long_prefill = st["long_prefill_token_threshold"]
        self.adaptive_long_prefill = st["long_prefill_token_threshold_adaptive"]
        self.chunked = st["enable_chunked_prefill"]
        self.reserve_full = st["scheduler_reserve_full_isl"]
        self.caching = st["enable_prefix_caching"]
        if num_blocks is None:  # what the engine gets from the default KV space, as VllmScheduler
            num_blocks = kv_blocks(st, DEFAULT_OPTIONS.kv_cache_gib)
        self.num_blocks = num_blocks
        self.watermark_blocks = int(st["watermark"] * num_blocks)
        self.pool = BlockPool(num_blocks)
        self._ones = (1,) * self.block_size
        self.running: list[_Request] = []
        self.waiting: deque[_Request] = deque()
        self._finished_unreported = False  # vLLM reports finished ids with the next schedule()

    def add(self, request_id: str, prompt_token_ids: list[int], output_tokens: int, arrival_s: float) -> None:
        self.waiting.append(_Request(request_id, prompt_token_ids, output_tokens))

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._finished_unreported)

    def abort(self, request_id: str) -> bool:
        """Drop a request (a client gone), freeing its KV blocks as vLLM's `finish_requests` does;
        False if it is not held (already finished, or never added)."""
        for queue in (self.running, self.waiting):
            for r in queue:
                if r.rid == request_id:
                    queue.remove(r)
                    self.pool.free(r.blocks[::-1])
                    r.blocks = []
                    return True
        return False

    @property
    def kv_usage(self) -> float:
        """Share of the KV blocks in use (vLLM's `BlockPool.get_usage`: the null block excluded)."""
        return 1.0 - self.pool.num_free / max(self.num_blocks - 1, 1)

    def step(self) -> ScheduledStep | None:
        """Schedule one step and complete it (one new token per request past its prompt)."""
        self._finished_unreported = False
        running, waiting, pool, bs = self.running, self.waiting, self.pool, self.block_size
        max_len, caching = self.max_model_len, self.caching
        # vLLM's token budget (max_num_scheduled_tokens) and input budget (max_num_batched_tokens)
        # shrink by the same amounts: the smaller one binds
        budget = self.budget
        eligible = len(running) + len(waiting)
        cap = self.long_prefill if eligible > 1 else 0
        if cap > 0 and self.adaptive_long_prefill:
            cap = max(cap, self.max_batched // eligible)
        reqs, rids, ctx, qry, preempted = [], [], [], [], []

        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            computed = r.computed
            n = r.num_tokens - computed
            if 0 < cap < n:
                n = cap
            if n > budget:
                n = budget
            if n > max_len - computed - 1:
                n = max_len - computed - 1
            if n <= 0:
                i += 1
                continue
            end = computed + n  # < max_len
            blocks = r.blocks
            if end > len(blocks) * bs:
                need = -(-end // bs) - len(blocks)
                victim = None
                while need > len(pool.plain) + len(pool.lru) and victim is not r:  # not enough free blocks
                    victim = running.pop()
                    self._preempt(victim)
                    preempted.append(victim.rid)
                if victim is r:  # it preempted itself: the pass ends
                    break
                blocks += pool.take(need)
            if caching and end // bs > r.num_cached:
                self._register(r, end // bs)
            reqs.append(r)
            rids.append(r.rid)
            ctx.append(computed)
            qry.append(n)
            r.computed = end
            budget -= n
            i += 1

        if not preempted:
            while budget > 0 and waiting and len(running) < self.max_active:
                r = waiting[0]
                hit = self._hit(r) if caching else []
                computed = len(hit) * bs
                n = r.num_tokens - computed
                if 0 < cap < n:
                    n = cap
                if n > budget:
                    if not self.chunked:
                        break
                    n = budget
                if not self._admit(r, hit, computed, n):
                    break
                waiting.popleft()
                running.append(r)
                reqs.append(r)
                rids.append(r.rid)
                ctx.append(computed)
                qry.append(n)
                r.computed = computed + n
                budget -= n

        if not reqs:
            return None
        finished, first = [], []
        for r in reqs:
            if r.computed < r.num_tokens:  # mid-prompt chunk: nothing sampled
                continue
            if r.num_tokens == r.num_prompt:
                first.append(r.rid)
            r.num_tokens += 1
            if r.num_tokens - r.num_prompt >= r.max_tokens or r.num_tokens >= max_len:
                finished.append(r.rid)
                pool.free(r.blocks[::-1])
                r.blocks = []
        if finished:
            done = set(finished)
            self.running = [r for r in running if r.rid not in done]
            self._finished_unreported = True
        return ScheduledStep(Batch(tuple(ctx), tuple(qry)), rids, finished,
                             sorted(preempted) if preempted else preempted, first)

    def _preempt(self, r: _Request) -> None:
        self.pool.free(r.blocks[::-1])
        r.blocks = []
        r.num_cached = 0
        r.computed = 0
        self.waiting.appendleft(r)

    def _admit(self, r: _Request, hit: list[int], computed: int, n: int) -> bool:
        """Allocate a waiting request's blocks (cache hit + new) for `n` new tokens, if they fit."""
        pool, bs = self.pool, self.block_size
        ref = pool.ref
        evictable = sum(1 for b in hit if ref[b] == 0)  # free cached blocks the hit takes out of the queue
        reserve = evictable + (self.watermark_blocks if self.running else 0)
        free = pool.num_free
        if self.reserve_full and max(-(-min(r.num_tokens, self.max_model_len) // bs) - len(hit), 0) + reserve > free:
            return False
        new = max(-(-min(computed + n, self.max_model_len) // bs) - len(hit), 0)
        if new + reserve > free:
            return False
        pool.touch(hit)
        r.blocks = hit + pool.take(new) if new else hit
        r.num_cached = len(hit)
        if self.caching:
            self._register(r, min(computed + n, r.num_tokens) // bs)
        return True

    def _hit(self, r: _Request) -> list[int]:
        """Blocks of the longest cached prefix, at most num_tokens - 1 tokens (the last is recomputed)."""
        n = (r.num_tokens - 1) // self.block_size
        if len(r.hashes) < n:
            self._hash_blocks(r, n)
        return self.pool.hit(r.hashes[:n])

    def _register(self, r: _Request, full: int) -> None:
        if full > r.num_cached:
            if len(r.hashes) < full:
                self._hash_blocks(r, full)
            self.pool.register(r.blocks, r.hashes, r.num_cached, full)
            r.num_cached = full

    def _hash_blocks(self, r: _Request, n: int) -> None:
        """Extend r.hashes to n blocks: hash(previous block's hash, this block's token ids)."""
        bs, prompt, hashes = self.block_size, r.prompt, r.hashes
        p = r.num_prompt
        prev = hashes[-1] if hashes else 0
        for i in range(len(hashes), n):
            a, b = i * bs, i * bs + bs
            if b <= p:
                tokens = tuple(prompt[a:b])
            elif a >= p:
                tokens = self._ones
            else:
                tokens = tuple(prompt[a:]) + self._ones[: b - p]
            prev = hash((prev, tokens))
            hashes.append(prev)
