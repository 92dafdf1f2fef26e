"""Building vLLM configs and a one-process distributed world, the way vLLM's own tests do."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path

from dooly.errors import DoolyError

def quiet_logs() -> None:
    """Error-level logs from vLLM unless the user chose a level (`VllmEngine.prepare`): the engine's
    members and this module's builders call it before importing vLLM, never at dooly's import."""
    from dooly.engines.vllm import ENGINE

    ENGINE.prepare()


def write_model_dir(config: dict, folder: Path) -> Path:
    """A model folder vLLM can read: config.json only (weights are dummy, tokenizer skipped)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def engine_config(model_dir: Path, dtype: str, tensor_parallel_size: int = 1, **engine_kwargs):
    """The VllmConfig `LLM(model_dir, enforce_eager=True, ...)` would build on this platform."""
    quiet_logs()
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    if isinstance(engine_kwargs.get("attention_backend"), str):
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        engine_kwargs["attention_backend"] = AttentionBackendEnum[engine_kwargs["attention_backend"]]
    args = EngineArgs(model=str(model_dir), skip_tokenizer_init=True, load_format="dummy", dtype=dtype,
                      enforce_eager=True, tensor_parallel_size=tensor_parallel_size, **engine_kwargs)
    try:
        with _quiet():
            return args.create_engine_config(UsageContext.LLM_CLASS)
    except Exception as e:  # vLLM validates the config; surface its message on one line
        method = engine_kwargs.get("quantization")
        if method and "quantization_config" not in json.loads((model_dir / "config.json").read_text()) \
                and method not in online_quantization_methods():
            raise DoolyError(f"--quantization {method} reads a checkpoint quantized that way, and this model's config "
                             f"has no quantization_config; methods that quantize at load: "
                             f"{', '.join(online_quantization_methods())}") from None
        raise DoolyError(f"vLLM rejected the model config: {config_error(e, model_dir)}") from e


def online_quantization_methods() -> list[str]:
    """The --quantization methods vLLM applies to an unquantized checkpoint as it loads it."""
    from vllm.config.quantization import ONLINE_QUANT_SHORTHAND_NAMES

    return ["fp8", "experts_int8", *(m for m in ONLINE_QUANT_SHORTHAND_NAMES if m != "online")]


def config_error(e: Exception, model_dir: Path | None = None) -> str:
    """The useful line of vLLM's config error (pydantic's messages, not its footer), without what
    means nothing to the user (the temporary model folder, the list of every architecture)."""
    text = _config_error_text(e)
    if "trust_remote_code" in text:
        return ("the config names code from the model's own repository (auto_map / an unknown model_type: "
                "trust_remote_code), which dooly does not run")
    text = re.sub(r"\s*Supported architectures: dict_keys\(\[.*?\]\)\.?", " (see vLLM's list of supported models)",
                  text)
    return text.replace(str(model_dir), "the model folder") if model_dir is not None else text


def _config_error_text(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            return "; ".join(f"{'.'.join(map(str, x['loc'])) + ': ' if x.get('loc') else ''}{x['msg']}"
                             for x in errors()).removeprefix("Value error, ")
        except Exception:  # noqa: BLE001 - not pydantic's shape after all: fall back to the text
            pass
    lines = [line.strip() for line in str(e).splitlines()
             if line.strip() and not line.strip().startswith("For further information")]
    return lines[-1] if lines else type(e).__name__


@contextlib.contextmanager
def _quiet():
    logger = logging.getLogger("vllm")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# vLLM's process-wide model-parallel groups (parallel_state module globals)
_GROUPS = ("_TP", "_ETP", "_ENGRAM_DP", "_DCP", "_PCP", "_PP", "_DP", "_EP", "_EPLB")


@contextlib.contextmanager
def private_world():
    """A single-process world (rank 0 of 1, gloo) with model-parallel groups made for the current
    config, private to the block.

    vLLM keeps its groups in module globals. An in-process engine in this process (validate,
    calibrate, tests) holds its own: they are set aside for the block and put back untouched after
    it, and the block's groups are destroyed. vLLM creates some groups (e.g. expert parallel) only
    for configs that need them, so they are made anew for every block. The process group itself is
    initialised once per process (by whichever comes first) and shared: both are worlds of one.
    Ours keeps its store in memory: a file store's folder would outlive every process that exits
    without running exit handlers (a Ray worker, a killed profiler).
    """
    quiet_logs()
    import torch.distributed as dist
    from vllm.distributed import parallel_state as ps

    saved = {name: getattr(ps, name) for name in _GROUPS if hasattr(ps, name)}
    for name in saved:
        setattr(ps, name, None)
    try:
        if not dist.is_initialized():
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo")
        ps.ensure_model_parallel_initialized(1, 1)
        yield
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        for name, group in saved.items():
            setattr(ps, name, group)


@contextlib.contextmanager
def worker_context(cfg):
    """What a vLLM worker sets up before running its model: current config, a private one-process
    world, IR op priorities, the platform's kernel overrides (on CPU: C++ stand-ins for vLLM's
    Triton kernels)."""
    import vllm.ir
    from vllm.config import set_current_vllm_config
    from vllm.platforms import current_platform

    with set_current_vllm_config(cfg), private_world():
        current_platform.register_triton_kernel_overrides()
        cfg.kernel_config.ir_op_priority.set_default()
        vllm.ir.set_default_torch_wrap(cfg.compilation_config.ir_enable_torch_wrap)
        yield
