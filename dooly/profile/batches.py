"""Batch compositions: what a stateful op's grid point stands for (engine-neutral).

A point names a step's attention work: `dec_reqs` decoding requests with `dec_kv` tokens of KV each,
and/or one prefill chunk of `pre_chunk` tokens after `pre_ctx` cached tokens; a KV-cache write point
names `num_tokens` new tokens; `batch_of` turns a point into the per-request `Batch` (dooly.records).
"""

from __future__ import annotations

from dooly.records import Batch


# Batch compositions swept for attention (variables: decode requests and their KV length; a prefill
# chunk and the context already cached before it; both together = a mixed step).
ATTENTION_GRIDS = {
    "full": {"dec_reqs": [1, 2, 4, 8, 16, 32, 64, 128, 256], "dec_kv": [128, 256, 512, 1024, 2048, 4096, 8192],
             "pre_chunk": [16, 64, 128, 256, 512, 1024, 2048, 4096], "pre_ctx": [0, 512, 1024, 2048, 4096],
             "mixed_reqs": [1, 8, 32], "mixed_kv": [512, 2048], "mixed_chunk": [128, 512, 2048]},
    "reduced": {"dec_reqs": [1, 8, 64], "dec_kv": [128, 1024, 4096], "pre_chunk": [16, 128, 512, 2048],
                "pre_ctx": [0, 1024], "mixed_reqs": [1, 8], "mixed_kv": [1024], "mixed_chunk": [128, 512]},
}
KV_UPDATE_TOKENS = {"full": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096],
                    "reduced": [1, 16, 128, 512, 2048]}


def batch_of(point: dict[str, int]) -> Batch:
    """The batch composition a grid point stands for (decodes first, then the prefill chunk)."""
    ctx, q = [], []
    if "dec_reqs" in point:
        ctx += [point["dec_kv"] - 1] * point["dec_reqs"]
        q += [1] * point["dec_reqs"]
    if "pre_chunk" in point:
        ctx.append(point.get("pre_ctx", 0))
        q.append(point["pre_chunk"])
    if "num_tokens" in point:  # KV-cache write of num_tokens new tokens
        ctx.append(0)
        q.append(point["num_tokens"])
    return Batch(tuple(ctx), tuple(q))
