"""HF transformers model code as a second engine: `generate()` (static batch: prefill, then decode with
a KV cache) and `generate_batch()` (continuous batching on a paged KV cache).

`ENGINE` is what the stages see (`dooly.engine_interface.Engine`); it needs torch and transformers
only (not vLLM), and importing this package imports neither: each member imports when called.
"""

from __future__ import annotations

from dooly.engine_interface import Engine

# dooly's name -> transformers' attn_implementation (5.19 deprecates the "paged|sdpa" alias of "sdpa")
ATTN_IMPLEMENTATIONS = {"sdpa": "sdpa", "eager": "eager", "flex_attention": "flex_attention",
                        "paged|sdpa": "sdpa", "paged|eager": "paged|eager"}


class HfEngine(Engine):
    name = "hf"
    request_vars = ("batch_size", "seq_len", "past_len", "num_tokens", "num_reqs")
    log_defaults = {"TRANSFORMERS_VERBOSITY": "error"}
    gemm_ops = ("aten::mm", "aten::addmm", "aten::linear", "aten::bmm")

    def version(self) -> str:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"transformers=={version('transformers')}"
        except PackageNotFoundError:
            return "transformers==unknown"

    def dispatch_key(self) -> str:
        """HF model code calls aten ops; torch picks their kernels inside the op, unseen by the trace."""
        return ""

    def attention_backends(self) -> list[str]:
        return list(ATTN_IMPLEMENTATIONS)

    def run_trace(self, config, tensor_parallel_size=1, dtype="bfloat16", pinned=None, **options):
        self.prepare()
        from dooly.engines.hf.tracer import run_trace

        return run_trace(config, tensor_parallel_size=tensor_parallel_size, dtype=dtype, **options)

    @property
    def stateful(self):
        self.prepare()
        from dooly.engines.hf import paged

        return paged

    def load_replay_rules(self) -> None:
        self.prepare()
        from dooly.engines.hf import replay  # noqa: F401  (registers its rules)


ENGINE = HfEngine()
