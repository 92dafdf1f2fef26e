"""Engine-option grids: `--grid name=v1,v2` parsed and validated, expanded into configurations.

Options are spelled as vLLM spells its engine arguments (`max_num_seqs`, or `max-num-seqs` as on
vLLM's command line). A configuration is one model with one value of every option; options the grid
does not name keep `Configuration`'s defaults (those of `dooly simulate`).

Validation happens before any simulation: each value on its own (type and range, the dtype, an
attention backend the engine offers here, a tensor-parallel degree dividing the model's heads), then
every combination through vLLM's own config checks (`scheduler_settings`, cached on disk). A
combination vLLM rejects is kept as "rejected" with vLLM's reason unless one value is rejected in
every combination it is part of: that value is the error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from dooly.errors import DoolyError
from dooly.records import DEFAULT_OPTIONS, EngineOptions


@dataclass(frozen=True)
class Configuration:
    model: str  # catalog id or config path, as given
    dtype: str = "bfloat16"
    tensor_parallel_size: int = 1
    attention_backend: str | None = DEFAULT_OPTIONS.attention_backend  # None: the engine's choice
    max_num_seqs: int = DEFAULT_OPTIONS.max_num_seqs
    max_num_batched_tokens: int = DEFAULT_OPTIONS.max_num_batched_tokens
    enable_chunked_prefill: bool = DEFAULT_OPTIONS.enable_chunked_prefill
    enable_prefix_caching: bool = DEFAULT_OPTIONS.enable_prefix_caching
    kv_cache_gib: float = DEFAULT_OPTIONS.kv_cache_gib  # each worker's KV space (the simulated KV blocks)
    kv_cache_dtype: str = DEFAULT_OPTIONS.kv_cache_dtype  # KV storage: more blocks in fp8, other attention kernels
    quantization: str | None = DEFAULT_OPTIONS.quantization  # weight quantization (None: the checkpoint's own)

    @property
    def key(self) -> str:
        """A readable, unique name: the model and every option that differs from its default."""
        parts = [self.model]
        for f in dataclasses.fields(self)[1:]:
            value = getattr(self, f.name)
            if value != f.default:
                parts.append(f"{f.name}={_text(value)}")
        return " ".join(parts)

    @property
    def trace_key(self) -> tuple:
        """What the traced step (and so its step predictor) depends on."""
        return (self.model, self.dtype, self.tensor_parallel_size, self.attention_backend, self.kv_cache_dtype,
                self.quantization)

    def engine_options(self) -> EngineOptions:
        return DEFAULT_OPTIONS.replace(attention_backend=self.attention_backend, max_num_seqs=self.max_num_seqs,
                                       max_num_batched_tokens=self.max_num_batched_tokens,
                                       enable_chunked_prefill=self.enable_chunked_prefill,
                                       enable_prefix_caching=self.enable_prefix_caching,
                                       kv_cache_gib=self.kv_cache_gib, kv_cache_dtype=self.kv_cache_dtype,
                                       quantization=self.quantization)

    def engine_kwargs(self) -> dict:
        """Scheduler options as the engine's config builder takes them (`scheduler_settings`)."""
        return self.engine_options().engine_kwargs(self.tensor_parallel_size)

    def deployment(self, spec=None):
        """The configuration resolved (`spec`: its model, if already resolved)."""
        from dooly.deployment import Deployment

        return Deployment.resolve(spec or self.model, dtype=self.dtype, tensor_parallel_size=self.tensor_parallel_size,
                                  options=self.engine_options())

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)[1:]}


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _positive_int(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise DoolyError(f"bad grid value {name}={text}: not an integer") from None
    if value <= 0:
        raise DoolyError(f"bad grid value {name}={text}: must be > 0")
    return value


def _positive_float(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DoolyError(f"bad grid value {name}={text}: not a number") from None
    if not value > 0:
        raise DoolyError(f"bad grid value {name}={text}: must be > 0")
    return value


def _bool(name: str, text: str) -> bool:
    low = text.lower()
    if low not in ("true", "false"):
        raise DoolyError(f"bad grid value {name}={text}: use true or false")
    return low == "true"


def _dtype(name: str, text: str) -> str:
    from dooly.trace import DTYPES

    if text not in DTYPES:
        raise DoolyError(f"bad grid value {name}={text}: dtypes are {', '.join(DTYPES)}")
    return text


def _backend(name: str, text: str) -> str:
    from dooly.engine_interface import get_engine

    available = get_engine("vllm").attention_backends()
    if text not in available:
        raise DoolyError(f"bad grid value {name}={text}: the engine offers {', '.join(available)} here")
    return text


def _kv_dtype(name: str, text: str) -> str:
    from dooly.engine_interface import get_engine

    offered = get_engine("vllm").kv_cache_dtypes()
    if text not in offered:
        raise DoolyError(f"bad grid value {name}={text}: the engine offers {', '.join(offered)} here")
    return text


def _quantization(name: str, text: str) -> str | None:
    """A vLLM --quantization method, or auto (the checkpoint's own quantization_config, if any)."""
    from dooly.engine_interface import get_engine

    if text == "auto":
        return None
    offered = get_engine("vllm").quantization_methods()
    if text not in offered:
        raise DoolyError(f"bad grid value {name}={text}: methods are auto, {', '.join(offered)}")
    return text


# option -> parser of one value (raises DoolyError naming the option and value)
PARSERS = {
    "max_num_seqs": _positive_int,
    "max_num_batched_tokens": _positive_int,
    "enable_chunked_prefill": _bool,
    "enable_prefix_caching": _bool,
    "attention_backend": _backend,
    "dtype": _dtype,
    "tensor_parallel_size": _positive_int,
    "kv_cache_gib": _positive_float,
    "kv_cache_dtype": _kv_dtype,
    "quantization": _quantization,
}
assert set(PARSERS) == {f.name for f in dataclasses.fields(Configuration)[1:]}

# The grid `dooly search` / `dooly capacity` use when none is given: the two scheduler limits.
DEFAULT_GRID = {"max_num_seqs": (64, 128, 256), "max_num_batched_tokens": (1024, 2048, 4096)}


def parse_grid(items) -> dict[str, tuple]:
    """["max_num_seqs=8,16", "enable_chunked_prefill=true,false"] -> {option: values}, in the order given."""
    grid: dict[str, tuple] = {}
    for item in items or []:
        name, eq, values = item.partition("=")
        name = name.strip().removeprefix("--").replace("-", "_")
        if not eq:
            raise DoolyError(f"bad grid {item!r}: use NAME=V1,V2,... (options: {', '.join(PARSERS)})")
        if name not in PARSERS:
            raise DoolyError(f"bad grid {item!r}: unknown option {name!r}; options: {', '.join(PARSERS)}")
        if name in grid:
            raise DoolyError(f"bad grid {item!r}: {name} is given twice")
        texts = [v.strip() for v in values.split(",")]
        if not all(texts):
            raise DoolyError(f"bad grid {item!r}: an empty value")
        parsed = tuple(PARSERS[name](name, t) for t in texts)
        if len(set(parsed)) != len(parsed):
            raise DoolyError(f"bad grid {item!r}: a value is repeated")
        grid[name] = parsed
    return grid


def configurations(models, grid: dict) -> list[Configuration]:
    """Every model x combination of the grid's values, in a fixed order (models, then options as given)."""
    from dooly.catalog import resolve

    names = list(grid)
    out = []
    for model in models:
        spec = resolve(model)
        if "tensor_parallel_size" in grid:
            _check_tp(spec, grid["tensor_parallel_size"])
        for values in itertools.product(*(grid[n] for n in names)):
            out.append(Configuration(model, **dict(zip(names, values))))
    if not out:
        raise DoolyError("no configurations: give at least one model")
    return out


def _check_tp(spec, degrees) -> None:
    from dooly.trace.core import check_tensor_parallel

    for tensor_parallel_size in degrees:
        check_tensor_parallel(spec, tensor_parallel_size,
                              f"bad grid value tensor_parallel_size={tensor_parallel_size}: it")


def engine_check(configs: list[Configuration], grid: dict) -> dict[str, str]:
    """vLLM's verdict on every combination: {configuration key: reason} for those it rejects.

    Raises DoolyError when a value of the grid is rejected in every combination it appears in."""
    from dooly.catalog import resolve
    from dooly.deployment import scheduler_settings

    rejected: dict[str, str] = {}
    specs = {}
    verdicts = _Rejections()
    for c in configs:
        spec = specs.get(c.model) or specs.setdefault(c.model, resolve(c.model))
        known = verdicts.get(spec.config, c)
        if known is not None:
            rejected[c.key] = known
            continue
        try:
            st = scheduler_settings(spec.config, c.dtype, **c.engine_kwargs())
        except DoolyError as e:
            rejected[c.key] = vllm_reason(e)
            verdicts.put(spec.config, c, rejected[c.key])
            continue
        if st["unsupported"]:
            rejected[c.key] = f"the simulator does not model {', '.join(st['unsupported'])}"
    if not rejected:
        return rejected
    for name, values in grid.items():
        for value in values:
            mine = [c for c in configs if getattr(c, name) == value]
            if mine and all(c.key in rejected for c in mine):
                raise DoolyError(f"bad grid value {name}={_text(value)}: vLLM rejects every configuration "
                                 f"with it, e.g. {mine[0].key}: {rejected[mine[0].key]}")
    if len(rejected) == len(configs):
        first = configs[0]
        raise DoolyError(f"vLLM rejects every configuration, e.g. {first.key}: {rejected[first.key]}")
    return rejected


def vllm_reason(e: DoolyError) -> str:
    """vLLM's reason for rejecting a configuration (the engine puts its useful line in the message)."""
    return str(e).removeprefix("vLLM rejected the model config: ")


class _Rejections:
    """vLLM's rejections, cached as JSON beside `scheduler_settings`' cache (which keeps only the
    accepted settings): a rejected combination costs vLLM's import and config checks (seconds) once.
    The key hashes what the verdict depends on: model config, dtype, options, vLLM's version and the
    code that builds the config."""

    def __init__(self):
        from dooly.deployment import settings_code
        from dooly.trace.cache import cache_dir

        self.code = settings_code("vllm")
        self.folder = cache_dir().parent / "schedulers-rejected"

    def _path(self, config: dict, c: Configuration) -> Path:
        text = json.dumps([config, c.dtype, c.engine_kwargs(), self.code], sort_keys=True, default=str)
        return self.folder / f"{hashlib.sha1(text.encode()).hexdigest()}.json"

    def get(self, config: dict, c: Configuration) -> str | None:
        try:
            return json.loads(self._path(config, c).read_text())["reason"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, config: dict, c: Configuration, reason: str) -> None:
        from dooly.trace.cache import write_atomic

        write_atomic(self._path(config, c), json.dumps({"reason": reason}))
