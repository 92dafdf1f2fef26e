"""The kernels vLLM's CPU build dispatches to on this machine, and fake kernels to trace them.

vLLM picks a GEMM kernel per linear layer when its weights are processed
(`dispatch_cpu_unquantized_gemm`): on CPUs with AMX tiles a weight of at most 1 MiB goes to the SGL
kernel (`_C::convert_weight_packed` packs it at load, `_C::weight_packed_linear` runs each call);
on AMD Zen with zentorch installed, `zentorch_linear_unary`; otherwise oneDNN (`_C::onednn_mm`).
Attention and the fused MoE pick an ISA string ("amx", "vec", ...) the same way.

A fake trace runs that code on tensors without data, so every engine op it reaches needs a fake
kernel returning the C++ kernel's exact output shapes and dtypes. `FAKE_KERNELS` is the one table
of them (op -> fake), registered only inside `fake_kernels()`; an op with neither a fake kernel of
its own nor an entry here stops the trace with one line naming it (`unsupported_op_message`).

The differential tracer reruns the model code under perturbed configs. Dispatch depends on sizes
(the 1 MiB limit, N/K alignment, N < 16), so `gemm_dispatch` records the kernel each linear layer
got in the real run and pins it in the perturbed runs: labels are those of the real config's kernels.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from dataclasses import dataclass
from typing import Callable

import torch

from dooly.engines.vllm import VllmEngine
from dooly.registry import registrar

TILE_N = 16  # the SGL kernels' N tile: convert_weight_packed packs N >= 16 in VNNI, N < 16 as fp32

# op -> fake kernel (same signature as the op); one entry per op, duplicates raise
FAKE_KERNELS: dict[str, Callable] = {}


fake_kernel = registrar(FAKE_KERNELS, "fake kernel")


@dataclass(frozen=True)
class GemmChoice:
    """The kernel one linear layer was dispatched to, and the layout of its packed weight."""

    kernel: str  # "sgl" (_C::weight_packed_linear) | "other" (oneDNN / zentorch / torch, by platform)
    layout: str = ""  # sgl: "vnni" (weight kept [N, K]) | "fp32" (transposed to fp32 [K, N], N < 16)


# set while vLLM dispatches one layer: {"layout": pinned layout or None, "packed": layout chosen}
_PACKING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("dooly_packing", default=None)


@fake_kernel("_C::convert_weight_packed")
def _convert_weight_packed(weight: torch.Tensor) -> torch.Tensor:
    # csrc/cpu/sgl-kernels/gemm.cpp: [.., N, K] bf16/fp16 -> VNNI-packed, same shape and dtype
    # (N a multiple of TILE_N); N < TILE_N (2-D only) -> fp32, transposed to [K, N];
    # int8 -> [.., N, K + 4]: each row gains its int32 s8s8 compensation.
    *lead, n, k = weight.shape
    slot = _PACKING.get()
    if weight.dtype == torch.int8:
        return weight.new_empty((*lead, n, k + 4))
    if weight.dtype not in (torch.bfloat16, torch.float16):
        raise NotImplementedError(f"_C::convert_weight_packed: no fake kernel for {weight.dtype} weights yet")
    pinned = (slot or {}).get("layout")
    layout = pinned or ("fp32" if n < TILE_N and not lead else "vnni")
    if slot is not None:
        slot["packed"] = layout
    if layout == "fp32":
        return weight.new_empty((*lead, k, n), dtype=torch.float32)
    if n % TILE_N and not pinned:
        raise RuntimeError(f"invalid weight out features {n}")  # what the C++ kernel says
    return weight.new_empty(weight.shape)


@fake_kernel("_C::causal_conv1d_weight_pack")
def _causal_conv1d_weight_pack(weight: torch.Tensor) -> torch.Tensor:
    return weight.new_empty(weight.shape)  # [dim, width] repacked in place of itself


@contextlib.contextmanager
def fake_kernels():
    """Register the table's fake kernels for the ops this build has that lack one; gone on exit."""
    from torch._library.simple_registry import singleton

    lib = torch.library.Library("_C", "FRAGMENT")  # registrations live as long as this object
    try:
        for op, fn in FAKE_KERNELS.items():
            ns, _, name = op.partition("::")
            if not hasattr(getattr(torch.ops, ns), name):
                continue  # not in this build
            if singleton.find(f"{ns}::{name}").fake_impl.kernel is not None:
                continue  # the engine registered one itself
            torch.library.register_fake(op, fn, lib=lib)
        yield
    finally:
        lib._destroy()


def unsupported_op_message(exc: BaseException) -> str | None:
    """One line for a FakeTensor 'unsupported operator' failure, naming the op; None for other errors."""
    from torch._subclasses.fake_tensor import DynamicOutputShapeException, UnsupportedOperatorException

    if isinstance(exc, (UnsupportedOperatorException, DynamicOutputShapeException)):
        func = exc.func
        name = f"{func._schema.name}" + ("" if func._overloadname == "default" else f".{func._overloadname}")
        return (f"the engine calls {name}, which has no fake kernel: add it to dooly.engines.vllm.kernels."
                f"FAKE_KERNELS to trace it")
    stub = re.search(r"Declaration: (\S+)\(\) -> \(\)", str(exc))
    if stub:  # an op this build declares without arguments or a kernel: a GPU kernel the CPU build lacks
        return f"this build has no CPU kernel for {stub.group(1)} (declared as an empty stub; a GPU build has one)"
    return None


@contextlib.contextmanager
def gemm_dispatch(model: torch.nn.Module, record: dict, pinned: dict | None = None):
    """Record (into `record`, layer name -> GemmChoice) the GEMM kernel vLLM gives each linear layer
    while the block runs vLLM's weight processing; with `pinned`, give each layer that choice instead
    of the one its (perturbed) sizes would get."""
    from vllm.model_executor.layers import utils

    names = {id(m): n for n, m in model.named_modules()}
    original, original_check = utils.dispatch_cpu_unquantized_gemm, utils.check_cpu_sgl_kernel

    def dispatch(layer, remove_weight):
        name = names.get(id(layer), "")
        pin = (pinned or {}).get(name)
        slot = {"layout": pin.layout if pin and pin.kernel == "sgl" else None, "packed": None}
        token = _PACKING.set(slot)
        if pin is not None:
            utils.check_cpu_sgl_kernel = lambda n, k, dtype: pin.kernel == "sgl"
        try:
            original(layer, remove_weight)
        finally:
            utils.check_cpu_sgl_kernel = original_check
            _PACKING.reset(token)
        if name:
            record[name] = GemmChoice("sgl", slot["packed"]) if slot["packed"] else GemmChoice("other")

    utils.dispatch_cpu_unquantized_gemm = dispatch
    try:
        yield record
    finally:
        utils.dispatch_cpu_unquantized_gemm = original


# --- what this machine dispatches to ------------------------------------------------------------

GEMM_OPS = VllmEngine.gemm_ops
# vLLM's CPU kernels take the ISA they run as a string argument ('amx', 'vec', ...)
ISAS = ("amx", "vec", "vec16", "neon", "vsx", "vxe", "rvv")


def isa_argument(consts: list[str]) -> str | None:
    """The ISA a traced op runs, from the canonical text of its constant arguments ("'amx'"), if any."""
    return next((c[1:-1] for c in consts if c[:1] == c[-1:] == "'" and c[1:-1] in ISAS), None)


def kernel_name(op: str, consts: list[str]) -> str:
    """A GEMM op's kernel as a person names it, with its ISA where it takes one: "fused MoE (vec)"."""
    isa = isa_argument(consts)
    return KERNEL_NAMES.get(op, op) + (f" ({isa})" if isa else "")


KERNEL_NAMES = {"_C::onednn_mm": "oneDNN", "_C::weight_packed_linear": "SGL (AMX brgemm)",
                "zentorch::zentorch_linear_unary": "zentorch", "aten::linear": "torch",
                "aten::mm": "torch", "aten::addmm": "torch", "_C::cpu_fused_moe": "fused MoE",
                "_C::fused_experts_cpu": "SGL fused MoE", "_C::int8_scaled_mm_with_quant": "SGL int8",
                "_C::onednn_scaled_mm": "oneDNN int8"}


def dispatch_key() -> str:
    """The predicates vLLM's CPU dispatch reads, as one string (a trace is only valid where they hold)."""
    from vllm.platforms import current_platform

    cpu = torch.cpu
    flags = {
        "amx_tile": cpu._is_amx_tile_supported(),
        "amx_fp16": cpu._is_amx_fp16_supported(),
        "avx512": cpu._is_avx512_supported(),
        "avx512_bf16": cpu._is_avx512_bf16_supported(),
        "zen": bool(current_platform.is_zen_cpu() and hasattr(torch.ops, "zentorch")
                    and hasattr(torch.ops.zentorch, "zentorch_linear_unary")),
    }
    return ",".join(f"{k}={int(v)}" for k, v in flags.items())


@contextlib.contextmanager
def amx_dispatch():
    """Inside the block vLLM's CPU dispatch sees AMX tiles, whatever this CPU has: a fake trace then
    records what an AMX machine (Intel Xeon, Sapphire Rapids and later) runs. Only for tracing and
    planning: no kernel may run in the block (AMX instructions do not exist here)."""
    global _forced
    saved = torch.cpu._is_amx_tile_supported
    torch.cpu._is_amx_tile_supported = lambda: True
    _forced += 1
    try:
        yield
    finally:
        _forced -= 1
        torch.cpu._is_amx_tile_supported = saved


_forced = 0  # amx_dispatch blocks open: the predicates are not this machine's


def dispatch_forced() -> bool:
    """Whether a predicate is forced now (`amx_dispatch`): the dispatch key is then not this machine's."""
    return _forced > 0
