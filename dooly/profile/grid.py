"""Sweep grids over request variables: serving-sized defaults, capped by the engine limits."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from dooly.records import DEFAULT_OPTIONS, VLLM_MAX_NUM_SEQS

GRIDS = {
    "full": {
        "num_tokens": [1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072,
                       4096, 6144, 8192],
        "num_reqs": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
        "batch_size": [1, 2, 4, 8, 16, 32, 64],
        "seq_len": [1, 16, 64, 128, 256, 512, 1024, 2048],
        "past_len": [16, 128, 512, 1024, 2048, 4096],
    },
    "reduced": {
        "num_tokens": [1, 16, 128, 512, 2048],
        "num_reqs": [1, 8, 64],
        "batch_size": [1, 8],
        "seq_len": [1, 128, 512],
        "past_len": [128, 1024],
    },
}


@dataclass(frozen=True)
class Limits:
    """Engine limits, spelled as vLLM spells them."""

    max_num_batched_tokens: int = DEFAULT_OPTIONS.max_num_batched_tokens
    max_num_seqs: int = VLLM_MAX_NUM_SEQS
    max_model_len: int = 8192

    def caps(self) -> dict[str, int]:
        return {"num_tokens": self.max_num_batched_tokens, "num_reqs": self.max_num_seqs,
                "batch_size": self.max_num_seqs, "seq_len": self.max_num_batched_tokens,
                "past_len": self.max_model_len}


def points(variables: tuple[str, ...], grid: str, limits: Limits) -> list[dict[str, int]]:
    """Grid points over `variables`, each capped by its engine limit (the limit itself included)."""
    if not variables:
        return [{}]
    caps = limits.caps()
    axes = []
    for v in variables:
        vals = [x for x in GRIDS[grid][v] if x <= caps[v]]
        if caps[v] not in vals and caps[v] < GRIDS[grid][v][-1]:
            vals.append(caps[v])
        axes.append(vals)
    out = []
    for combo in itertools.product(*axes):
        p = dict(zip(variables, combo))
        if "num_reqs" in p and "num_tokens" in p and p["num_reqs"] > p["num_tokens"]:
            continue  # a step has at least one token per request
        if "batch_size" in p and "seq_len" in p and p["batch_size"] * p["seq_len"] > caps["num_tokens"]:
            continue
        out.append(p)
    return out
