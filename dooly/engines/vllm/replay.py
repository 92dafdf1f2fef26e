"""Replay rules for vLLM's CPU custom ops whose inputs are more than random tensors, and what this
machine cannot replay."""

from __future__ import annotations

import json

import torch
import vllm._custom_ops  # noqa: F401 - registers the _C ops replayed here (a worker may not have traced)

from dooly.engines.vllm.kernels import isa_argument
from dooly.profile.replay import NotReplayable, replay_rule, resolve_op


@replay_rule("_C::onednn_mm")
def _onednn_mm(args, kwargs):
    # _C::onednn_mm(out [M, N], x [M, K], bias [N]?, handle): the weight lives in the oneDNN handle,
    # built the way vLLM's CPU linear dispatch builds it, from a fresh random [N, K] weight.
    import vllm._custom_ops as ops

    out, x, bias, _ = args
    weight = torch.randn(out.shape[-1], x.shape[-1], dtype=torch.float32).to(x.dtype)
    handler = ops.create_onednn_mm(weight.t(), 32)
    return [out, x, bias, handler.handler_tensor], kwargs, [weight, handler]


@replay_rule("_C::onednn_scaled_mm")
def _onednn_scaled_mm(args, kwargs):
    # _C::onednn_scaled_mm(out [M, N], x int8 [M, K], x scale ([M, 1] dynamic, a scalar static)?,
    # x zero point?, azp adjustment?, bias?, handle): the int8 weight lives in the oneDNN handle, built
    # the way vLLM's CPU int8 kernel builds it at load (`ops.create_onednn_scaled_mm` of the [K, N]
    # view of a fresh random int8 [N, K] weight, per-channel fp32 scales).
    import vllm._custom_ops as ops

    out, x, x_scale, x_zp = args[0], args[1], args[2], args[3]
    n, k = out.shape[-1], x.shape[-1]
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scales = torch.rand(n, 1, dtype=torch.float32) * 1e-2 + 1e-3
    dynamic = x_scale is not None and x_scale.dim() == 2
    handler = ops.create_onednn_scaled_mm(weight.t(), scales, out.dtype, dynamic, x_zp is not None, 32)
    args = list(args)
    if x_scale is not None:  # positive scales, as the quantization op computes them
        args[2] = x_scale.abs() + 1e-3
    args[6] = handler.handler_tensor
    return args, kwargs, [weight, scales, handler]


@replay_rule("_C::weight_packed_linear")
def _weight_packed_linear(args, kwargs):
    # _C::weight_packed_linear(out [M, N], x [M, K], packed, bias [N] fp32?, is_vnni): the packed
    # operand is what vLLM's dispatch makes at load: _C::convert_weight_packed of the [N, K] weight
    # (VNNI layout, same dtype; fp32 [K, N] when N < 16). Packed here by that same op.
    out, x, packed = args[0], args[1], args[2]
    dtype = x.dtype if packed.dtype == torch.float32 else packed.dtype
    weight = torch.randn(out.shape[-1], x.shape[-1], dtype=torch.float32).to(dtype)
    args[2] = torch.ops._C.convert_weight_packed(weight)
    if tuple(args[2].shape) != tuple(packed.shape) or args[2].dtype != packed.dtype:
        raise NotReplayable(f"_C::convert_weight_packed gave {tuple(args[2].shape)} {args[2].dtype} here, "
                            f"the trace has {tuple(packed.shape)} {packed.dtype}")
    return args, kwargs, [weight]


@replay_rule("_C::int8_scaled_mm_with_quant")
def _int8_scaled_mm_with_quant(args, kwargs):
    # _C::int8_scaled_mm_with_quant(x [M, K], packed int8 [N, K + 4], scales fp32 [N, 1], bias fp32?,
    # out dtype, is_vnni): vLLM's CPU int8 kernel on AMX machines quantizes x itself; its weight is
    # packed at load by _C::convert_weight_packed of the int8 [N, K] weight, packed here the same way.
    x, packed = args[0], args[1]
    weight = torch.randint(-127, 128, (packed.shape[0], x.shape[-1]), dtype=torch.int8)
    args = list(args)
    args[1] = torch.ops._C.convert_weight_packed(weight)
    if tuple(args[1].shape) != tuple(packed.shape) or args[1].dtype != packed.dtype:
        raise NotReplayable(f"_C::convert_weight_packed gave {tuple(args[1].shape)} {args[1].dtype} here, "
                            f"the trace has {tuple(packed.shape)} {packed.dtype}")
    args[2] = args[2].abs() + 1e-3  # positive per-channel scales
    return args, kwargs, [weight]


@replay_rule("_C::cpu_fused_moe")
def _cpu_fused_moe(args, kwargs):
    # expert weights prepacked for the traced ISA as vLLM's CPU experts do at load
    # (_C::prepack_moe_weight); topk ids must name real experts: each token picks k distinct
    # experts uniformly at random
    isa = args[10]
    args[2] = _prepacked(args[2], isa)
    args[3] = _prepacked(args[3], isa)
    num_experts = args[2].shape[0]
    ids = args[7]
    tokens, k = ids.shape
    args[7] = torch.rand(tokens, num_experts).argsort(dim=1)[:, :k].to(ids.dtype).contiguous()
    args[6] = torch.softmax(torch.randn(tokens, k), dim=1).to(args[6].dtype)
    return args, kwargs, []


def _prepacked(weight: torch.Tensor, isa: str) -> torch.Tensor:
    packed = torch.empty_like(weight)
    torch.ops._C.prepack_moe_weight(weight, packed, isa)
    return packed


def replay_blocker(op: str, signature_text: str, attrs: dict) -> str | None:
    """Why this op cannot be measured on this machine, in a few words (None: it can): an ISA it was
    traced with that this CPU lacks, or an op this build of the engine does not have."""
    if op.startswith("vllm::"):  # leaf ops measured through the engine's own set-up (attention rig)
        isa = attrs.get("isa")
    else:
        try:
            resolve_op(op)
        except NotReplayable:
            return "not in this build of the engine"
        isa = isa_argument([a["c"] for a in json.loads(signature_text)["args"] if "c" in a])
    if isa == "amx" and not torch.cpu._is_amx_tile_supported():
        return "traced for AMX tiles (isa 'amx'); this CPU has none"
    return None
