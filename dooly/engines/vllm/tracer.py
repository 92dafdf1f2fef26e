"""Trace vLLM's own model code as its CPU/GPU worker runs it, without allocating weights.

The model is built by vLLM's `initialize_model` under a FakeTensorMode, post-processed by vLLM's own
`process_weights_after_loading` (so the GEMM kernels the worker would pick are the ones recorded,
e.g. `_C::onednn_mm` on CPU), and run for one engine step whose token count and request count are
symbolic. Attention and KV-cache writes stay leaf ops (`vllm::unified_attention_with_output`,
`vllm::unified_kv_cache_update`); their kernel identity goes into the op's attrs.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch

from dooly.engine_interface import RunResult
from dooly.engines.vllm.kernels import dispatch_key, fake_kernels, gemm_dispatch, unsupported_op_message
from dooly.engines.vllm.setup import engine_config, worker_context, write_model_dir
from dooly.errors import DoolyError
from dooly.records import quantization_name
from dooly.trace.recorder import record_ops

class _ShmCollectives:
    """Issues the ops vLLM's CPU shared-memory communicator issues (handle unused under fake mode)."""

    def all_reduce(self, input, group=None):
        torch.ops._C.shm_allreduce(0, input)

    def all_gather_into_tensor(self, output, input, group=None):
        torch.ops._C.shm_all_gather(0, input, output)


@contextlib.contextmanager
def as_tp_rank(tensor_parallel_size: int, rank: int = 0):
    """Make this one-process world look like rank `rank` of a TP group of `tp` to the model code."""
    if tensor_parallel_size == 1:
        yield
        return
    from vllm.distributed import parallel_state as ps
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    group = ps.get_tp_group()
    comm = object.__new__(CpuCommunicator)  # vLLM's own reshaping logic, our op issuing
    comm.world_size, comm.rank_in_group, comm.ranks = tensor_parallel_size, rank, list(range(tensor_parallel_size))
    comm.rank, comm.device_group, comm.cpu_group = rank, None, None
    comm.dist_module = _ShmCollectives()
    names = ("world_size", "rank_in_group", "ranks", "device_communicator")
    saved = {k: getattr(group, k) for k in names}
    group.world_size, group.rank_in_group, group.ranks, group.device_communicator = (
        tensor_parallel_size,
        rank,
        list(range(tensor_parallel_size)),
        comm,
    )
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(group, k, v)


class _FakeOneDNNHandler:
    """Stands in for the oneDNN handle object while weights are fake (no data to pack)."""

    def __init__(self, weight: torch.Tensor, *_options):  # create_onednn_mm / create_onednn_scaled_mm
        self.k, self.n = weight.size()
        self.handler_tensor = torch.tensor(0, dtype=torch.int64)


@contextlib.contextmanager
def _weights_without_data():
    """vLLM's CPU weight post-processing, minus the steps that read weight data: the oneDNN handles
    (bf16 and int8 weights) and a quantized checkpoint's KV-cache scales (read with `.item()`; the
    KV cache's dtype, not its scales, decides the kernels)."""
    import vllm._custom_ops as ops
    from vllm.model_executor.layers.quantization.compressed_tensors import compressed_tensors
    from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod

    kv_methods = [m for m in vars(compressed_tensors).values()
                  if isinstance(m, type) and issubclass(m, BaseKVCacheMethod) and m is not BaseKVCacheMethod]
    saved = ops.create_onednn_mm, ops.create_onednn_scaled_mm, {m: m.__dict__.get("process_weights_after_loading")
                                                                  for m in kv_methods}
    ops.create_onednn_mm = ops.create_onednn_scaled_mm = _FakeOneDNNHandler
    for m in kv_methods:
        m.process_weights_after_loading = lambda self, layer: None
    try:
        yield
    finally:
        ops.create_onednn_mm, ops.create_onednn_scaled_mm, methods = saved
        for m, f in methods.items():
            if f is None:
                del m.process_weights_after_loading  # inherited again
            else:
                m.process_weights_after_loading = f


def attention_describer(cfg):
    from vllm.utils.torch_utils import LayerName

    ctx = cfg.compilation_config.static_forward_context

    def describe(obj):
        if not isinstance(obj, LayerName):
            return None
        layer = ctx.get(obj.value)
        if layer is None:
            return "layer", {}
        return "layer", attention_attrs(layer, cfg)

    return describe


def attention_isa(layer, cfg) -> str | None:
    """The ISA vLLM's CPU attention picks for this layer on this machine ("amx", "vec", "vec16", ...),
    as its metadata builder picks it; None for other backends."""
    if layer.attn_backend.get_name() != "CPU_ATTN":
        return None
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    try:
        return _get_attn_isa(cfg.model_config.dtype, cfg.cache_config.block_size, layer.head_size,
                             str(layer.kv_cache_dtype))
    except NotImplementedError as e:  # e.g. an FP8 KV cache at a head size the CPU kernels lack
        raise DoolyError(f"vLLM's CPU attention refuses this layer (head_size={layer.head_size}, "
                         f"kv_cache_dtype={layer.kv_cache_dtype}): {e}") from None


def attention_attrs(layer, cfg) -> dict:
    """Everything about an attention layer that changes its kernel's latency besides tensor shapes."""
    return {
        "backend": layer.attn_backend.get_name(),
        "isa": attention_isa(layer, cfg),
        "num_heads": layer.num_heads,
        "num_kv_heads": layer.num_kv_heads,
        "head_size": layer.head_size,
        "sliding_window": layer.sliding_window,
        "kv_cache_dtype": str(layer.kv_cache_dtype),
        "block_size": cfg.cache_config.block_size,
        "logits_soft_cap": getattr(layer.impl, "logits_soft_cap", None),
        "attn_type": str(getattr(layer, "attn_type", "decoder")),
    }


def build_fake_model(cfg, fake_mode, tensor_parallel_size: int = 1, rank: int = 0, pinned: dict | None = None):
    """vLLM's model for `cfg` on fake weights, post-processed as the worker does; returns the model
    and the GEMM kernel each linear layer was dispatched to (`pinned`: force those choices)."""
    from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    cfg.compilation_config.static_forward_context.clear()
    dispatch: dict = {}
    with (
        as_tp_rank(tensor_parallel_size, rank),
        _weights_without_data(),
        set_default_torch_dtype(cfg.model_config.dtype),
        fake_mode,
        torch.device("cpu"),
    ):
        model = initialize_model(vllm_config=cfg)
        with gemm_dispatch(model, dispatch, pinned):
            process_weights_after_loading(model, cfg.model_config, torch.device("cpu"))
    return model, dispatch


@contextlib.contextmanager
def private_rope_cache():
    """vLLM shares rotary-embedding modules through a process-wide cache; one built under fake mode
    must not outlive the block, or a real engine started later in this process would pick up its
    fake cos/sin cache (every rotary call then runs through fake-tensor dispatch, ~1 ms, and does
    nothing). The cache is emptied for the block and restored after it."""
    from vllm.model_executor.layers import rotary_embedding

    saved = dict(rotary_embedding._ROPE_DICT)
    rotary_embedding._ROPE_DICT.clear()
    try:
        yield
    finally:
        rotary_embedding._ROPE_DICT.clear()
        rotary_embedding._ROPE_DICT.update(saved)


def run_trace(config: dict, tensor_parallel_size: int = 1, dtype: str = "bfloat16", rank: int = 0,
              hints: tuple[int, int] = (37, 3), attention_backend: str | None = None,
              pinned: dict | None = None, kv_cache_dtype: str | None = None,
              quantization: str | None = None) -> RunResult:
    """One symbolic engine step (num_tokens tokens, num_reqs requests) through vLLM's model code.

    pinned: the kernel choices of another run (`RunResult.dispatch`) to give every linear layer."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    extra = {"attention_backend": attention_backend} if attention_backend else {}
    if kv_cache_dtype:
        extra["kv_cache_dtype"] = kv_cache_dtype
    if quantization:
        extra["quantization"] = quantization
    with tempfile.TemporaryDirectory(prefix="dooly-model-") as tmp:
        cfg = engine_config(write_model_dir(config, Path(tmp)), dtype, tensor_parallel_size, **extra)
    arch = config.get("architectures", ["?"])[0]
    with worker_context(cfg), private_rope_cache(), fake_kernels():
        shape_env = ShapeEnv(specialize_zero_one=False)
        fm = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)
        quant = quantization or quantization_name(config)
        try:
            model, dispatch = build_fake_model(cfg, fm, tensor_parallel_size, rank, pinned)
        except (AssertionError, ValueError, NotImplementedError, RuntimeError, AttributeError, TypeError) as e:
            why = unsupported_op_message(e) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
            if quant:  # a scheme whose CPU kernels need weight data to set up, or that this build lacks
                raise DoolyError(f"{arch} quantized as {quant} cannot be traced here: vLLM's CPU weight set-up for "
                                 f"it failed ({why}); traced schemes: compressed-tensors int8 W8A8") from None
            if isinstance(e, (AttributeError, TypeError)):
                raise
            raise DoolyError(f"vLLM could not build {arch} at tp={tensor_parallel_size}: {why}") from None
        try:
            ops, symbols = _forward(model, cfg, fm, hints, tensor_parallel_size, rank)
        except (NotImplementedError, RuntimeError) as e:
            why = unsupported_op_message(e)
            if why is None:
                raise
            raise DoolyError(f"vLLM's {arch} step at tp={tensor_parallel_size}: {why}") from None
        guards = [str(g.expr) for g in shape_env.guards]
        specialized = [name for sym, name in symbols.items() if sym in shape_env.replacements]
        del model
        cfg.compilation_config.static_forward_context.clear()
    return RunResult(ops=ops, symbols=symbols, guards=guards, specialized=specialized, dispatch=dispatch,
                     dispatch_key=dispatch_key())


def _forward(model, cfg, fm, hints, tensor_parallel_size, rank) -> tuple[list, dict]:
    """The recorded ops of one symbolic step, and its symbol -> request variable map."""
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext
    from vllm.forward_context import set_forward_context

    dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC])
    n_tok, n_req = hints
    # dtypes as the model runner's persistent input buffers hold them
    input_ids = fm.from_tensor(torch.zeros(n_tok, dtype=torch.int32), symbolic_context=dynamic)
    logits_idx = fm.from_tensor(torch.zeros(n_req, dtype=torch.int64), symbolic_context=dynamic)
    symbols = {input_ids.shape[0].node.expr: "num_tokens", logits_idx.shape[0].node.expr: "num_reqs"}
    describe = attention_describer(cfg)
    with as_tp_rank(tensor_parallel_size, rank), torch.inference_mode(), fm:
        positions = torch.arange(input_ids.shape[0])
        with set_forward_context(None, cfg, num_tokens=n_tok):
            with record_ops(model, describe) as rec:
                hidden = model(input_ids=input_ids, positions=positions)
                forward_ops = rec.ops[:]
            sampled = hidden[logits_idx]  # the runner's indexing, outside the model
            with record_ops(model, describe) as rec2:
                model.compute_logits(sampled)
    return forward_ops + rec2.ops, symbols
