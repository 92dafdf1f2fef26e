"""Replay rules for vLLM's CPU custom ops whose inputs are more than random tensors."""

from __future__ import annotations

import torch
import vllm._custom_ops  # noqa: F401 - registers the _C ops replayed here (a worker may not have traced)

from dooly.profile.replay import replay_rule


@replay_rule("_C::onednn_mm")
def _onednn_mm(args, kwargs):
    # _C::onednn_mm(out [M, N], x [M, K], bias [N]?, handle): the weight lives in the oneDNN handle,
    # built the way vLLM's CPU linear dispatch builds it, from a fresh random [N, K] weight.
    import vllm._custom_ops as ops

    out, x, bias, _ = args
    weight = torch.randn(out.shape[-1], x.shape[-1], dtype=torch.float32).to(x.dtype)
    handler = ops.create_onednn_mm(weight.t(), 32)
    return [out, x, bias, handler.handler_tensor], kwargs, [weight, handler]


@replay_rule("_C::cpu_fused_moe")
def _cpu_fused_moe(args, kwargs):
    # topk ids must name real experts: each token picks k distinct experts uniformly at random
    num_experts = args[2].shape[0]
    ids = args[7]
    tokens, k = ids.shape
    args[7] = torch.rand(tokens, num_experts).argsort(dim=1)[:, :k].to(ids.dtype).contiguous()
    args[6] = torch.softmax(torch.randn(tokens, k), dim=1).to(args[6].dtype)
    return args, kwargs, []
