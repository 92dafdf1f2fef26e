"""What the pipeline's stages may ask of a serving engine, and how they find one by name.

Engine-specific code lives only in `dooly.engines.<name>`, whose package exposes `ENGINE`, an
instance of an `Engine` subclass. The stages reach an engine only through `get_engine(name)`: they
depend on this interface, never on an engine module, so a GPU build or another engine plugs in
without touching them. Getting an engine imports none of its heavy dependencies (torch, vLLM,
transformers): each member imports what it needs when called.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

from dooly.errors import DoolyError
from dooly.records import classify, op_family

ENGINES = ("vllm", "hf")
LIBRARIES = {"vllm": "vllm", "hf": "transformers"}  # what each engine needs installed
EXTRAS = {"vllm": "cpu", "hf": "hf"}  # the pyproject extra that installs it


@dataclass
class RunResult:
    """The raw output of one traced run of an engine's model code."""

    ops: list  # RawOp in execution order, every phase
    symbols: dict  # sympy Symbol of the run's ShapeEnv -> request variable name
    guards: list = field(default_factory=list)  # conditions on request vars the run assumed (text)
    specialized: list = field(default_factory=list)  # request vars the engine pinned to a constant
    dispatch: dict = field(default_factory=dict)  # layer name -> kernel choice made at weight loading;
    #                                               given back as run_trace(pinned=...) to perturbed runs
    dispatch_key: str = ""  # the hardware predicates the engine's kernel dispatch read ("" = none)


class Engine:
    """A serving engine, as the stages see it. Members an engine does not have raise `DoolyError`.

    Tracing (every engine):
      name, request_vars         its name; the request variables its traced steps are labelled with
      version()                  "<distribution>==<version>" (no import of the engine)
      dispatch_key()             the hardware predicates its kernel dispatch reads (part of a trace's
                                 cache key: a trace is valid only where they hold)
      attention_backends()       the backends it offers here
      shape_free_options         trace options that change kernels but no traced shape (the labelling
                                 runs on perturbed configs go without them)
      kv_cache_dtypes(backend)   the KV-cache storage dtypes an attention backend offers ("auto" first)
      quantization_methods()     the weight-quantization methods its --quantization takes (none: [])
    Serving (dooly serve):
      metric_buckets(max_model_len)  bucket bounds of its Prometheus histograms, by family
      run_trace(config, tp, dtype, pinned=None, **options) -> RunResult
                                 one traced forward pass per phase; `pinned` = another run's `dispatch`
    Profiling:
      collective_prefixes        names of its ops that run between the ranks of a tensor-parallel group
      attention_op, kv_write_op  its stateful attention and KV-cache write ops (None: none)
      stateful                   its stateful-op rig (attention, KV-cache writes through its own set-up):
                                 a module with STATEFUL_OPS, stateful_points, kv_token_budget,
                                 StatefulProfiler; None if it has none
      collectives                its collectives rig (COLLECTIVE_OPS, CollectiveProfiler); None if none
      load_replay_rules()        registers its replay rules for ops that cannot be replayed from a
                                 signature alone (packed weights, ...)
      replay_blocker(op, text, attrs) -> str | None
                                 why this machine cannot measure a traced op (None: it can)
      gemm_ops, kernel_name(op, consts)
                                 its GEMM ops, and the kernel a GEMM op runs as a person names it
      op_family(op)              gemm / attention / kv_write / elementwise / collective / free, for
                                 comparing an op's time inside the engine with its isolated measurement
    Serving (engines that serve: vLLM):
      resolve_scheduler_settings(config, dtype, engine_kwargs) -> dict
                                 the scheduling settings the engine really uses for these options
      settings_sources()         files whose code decides those settings (part of their cache key)
      scheduler(config, dtype, num_blocks, **engine_kwargs)
                                 its own scheduler, driven in virtual time
      running_engine(config, dtype, kv_cache_gib, threads, **engine_kwargs)
                                 context manager: the real engine in-process, process state restored after
      serve(llm, requests, vocab) -> (RequestResult list, StepResult list)
      engine_settings(llm) -> dict
                                 the options a running engine actually uses (vLLM may lower some)
      time_ops(llm)              context manager yielding a list that gets, per model step served
                                 inside it, {op: [in-engine microseconds, calls]}
    """

    name: str = ""
    request_vars: tuple[str, ...] = ()
    collective_prefixes: tuple[str, ...] = ()
    gemm_ops: tuple[str, ...] = ()
    shape_free_options: tuple[str, ...] = ()  # trace options that change kernels, never a traced tensor shape
    attention_op: str | None = None  # its stateful attention op (reads the KV cache), if it has one
    kv_write_op: str | None = None  # its stateful KV-cache write op, if it has one

    log_defaults: dict = {}  # environment variables its libraries read at import (log levels); a user's win
    loggers: dict = {}  # logger name -> the variable holding its level (set before the library logs)

    def prepare(self) -> None:
        """What its members do before importing the engine's libraries: quieter logs unless the user
        chose a level (never done at dooly's import)."""
        import os

        if not available(self.name):
            raise DoolyError(f"the {self.name} engine's library ({LIBRARIES[self.name]}) is not installed here; "
                             f"install it (pip install 'dooly[{EXTRAS[self.name]}]') or use another engine "
                             f"(--engine {'hf' if self.name == 'vllm' else 'vllm'})")
        for key, value in self.log_defaults.items():
            os.environ.setdefault(key, value)
        for logger, key in self.loggers.items():
            # a library may log at import, before it configures its loggers from its variable
            level = os.environ.get(key, "")
            if level.isalpha():
                logging.getLogger(logger).setLevel(level.upper())

    def version(self) -> str:
        raise NotImplementedError

    def dispatch_key(self) -> str:
        return ""

    def attention_backends(self) -> list[str]:
        raise NotImplementedError

    def kv_cache_dtypes(self, attention_backend: str | None = None) -> list[str]:
        return ["auto"]

    def quantization_methods(self) -> list[str]:
        return []

    def metric_buckets(self, max_model_len: int) -> dict[str, list[float]]:
        """Histogram bucket bounds of the engine's own serving metrics, by family (time_to_first_token,
        inter_token_latency, request_latency, request_tokens, iteration_tokens)."""
        raise DoolyError(f"the {self.name} engine has no serving metrics to imitate")

    def run_trace(
        self,
        config: dict,
        tensor_parallel_size: int = 1,
        dtype: str = "bfloat16",
        pinned: dict | None = None,
        **options,
    ) -> RunResult:
        raise NotImplementedError

    @property
    def stateful(self):
        return None

    @property
    def collectives(self):
        return None

    def load_replay_rules(self) -> None:
        return None

    def replay_blocker(self, op: str, signature_text: str, attrs: dict) -> str | None:
        return None

    def kernel_name(self, op: str, consts: list[str]) -> str:
        return op

    def classify(self, op: str, attrs: tuple) -> str:
        """The kind of one of its traced ops (`dooly.records.classify`)."""
        return classify(op, attrs, self.collective_prefixes)

    def op_family(self, op: str) -> str:
        """The family of one of its ops (`dooly.records.op_family`): gemm, attention, kv_write, ..."""
        return op_family(op, self.gemm_ops, self.attention_op, self.kv_write_op, self.collective_prefixes)

    # serving
    def _not_serving(self, what: str):
        return DoolyError(f"the {self.name} engine does not {what}; engines that do: vllm")

    def resolve_scheduler_settings(self, config: dict, dtype: str, engine_kwargs: dict) -> dict:
        raise self._not_serving("resolve scheduler settings")

    def settings_sources(self) -> list[Path]:
        return []

    def scheduler(self, config: dict, dtype: str, num_blocks: int | None = None, **engine_kwargs):
        raise self._not_serving("offer its scheduler")

    def running_engine(self, config: dict, dtype: str = "bfloat16", kv_cache_gib: float = 1, threads: int | None = None,
                       **engine_kwargs):
        raise self._not_serving("serve in-process")

    def serve(self, llm, requests, vocab: int):
        raise self._not_serving("serve in-process")

    def engine_settings(self, llm) -> dict:
        raise self._not_serving("serve in-process")

    def time_ops(self, llm):
        raise self._not_serving("time its ops in-process")


def get_engine(name: str) -> Engine:
    if name not in ENGINES:
        raise DoolyError(f"unknown engine {name!r}; engines: {', '.join(ENGINES)}")
    return importlib.import_module(f"dooly.engines.{name}").ENGINE


@functools.lru_cache(maxsize=None)
def available(name: str) -> bool:
    """Whether an engine's own library is installed here (vLLM is an optional extra)."""
    try:
        return importlib.util.find_spec(LIBRARIES[name]) is not None
    except (ImportError, ValueError):
        return False
