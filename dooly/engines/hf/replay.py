"""Replay for the HF engine's signatures.

Importing this module registers the engine's leaf ops (`dooly::hf_*`, defined in `ops.py`) so their
signatures resolve; the flex attention ones then replay for real from the signature alone (the
paged KV ops are stateful: `paged.py` times them).
"""

from __future__ import annotations

import torch

import dooly.engines.hf.ops  # noqa: F401  (registers the dooly::hf_* operators)
from dooly.profile.replay import replay_rule


@replay_rule("aten::index.Tensor")
def _index(args, kwargs):
    # continuous batching gathers the rows that sample (hidden[:, logits_indices]): replayed indices
    # must lie inside the dim they index (random 0/1 overruns a step of one token)
    self, indices = args[0], args[1]
    args[1] = [i if i is None or i.dtype == torch.bool else torch.randint(0, self.shape[d], i.shape, dtype=i.dtype)
               for d, i in enumerate(indices)]
    return args, kwargs, []
