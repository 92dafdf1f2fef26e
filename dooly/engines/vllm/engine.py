"""The real vLLM engine, in-process with dummy weights, and a recorder of what its model executes.

Used to check the tracer against what the engine really runs (and, later, for ground truth).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from pathlib import Path

from dooly.engines.vllm.setup import write_model_dir
from dooly.engines.vllm.tracer import attention_describer
from dooly.trace.recorder import record_ops


def start_engine(config: dict, dtype: str = "bfloat16", kv_cache_gib: int = 1, threads: int | None = None,
                 **engine_kwargs):
    """An in-process `vllm.LLM` (V1 engine, eager) on a random-weight model built from `config`.

    `threads`: OpenMP threads per worker, the number the latency database was measured with
    (default: `dooly.profile.default_threads(K)`). It is set explicitly: in-process, vLLM's CPU
    worker would otherwise compute with whatever this process has (every core, unless
    OMP_NUM_THREADS says otherwise), and predictions measured at one thread would be compared
    with an engine running two. With `tensor_parallel_size=K > 1` vLLM's CPU build starts K worker
    processes; unless VLLM_CPU_OMP_THREADS_BIND says otherwise, worker k is bound to the k-th run
    of `threads` allowed cores (its automatic binding wants one NUMA node per worker, which a small
    machine does not have).
    """
    import torch

    from dooly.errors import DoolyError
    from dooly.profile.environment import default_threads

    from dooly.engines.vllm.setup import quiet_logs

    quiet_logs()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if float(kv_cache_gib) != int(kv_cache_gib) or kv_cache_gib < 1:
        raise DoolyError(f"vLLM's CPU engine takes its KV-cache space in whole GiB, got {kv_cache_gib}")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib))  # the argument, whatever an earlier engine set
    tensor_parallel_size = int(engine_kwargs.get("tensor_parallel_size", 1))
    threads = threads or default_threads(tensor_parallel_size)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < tensor_parallel_size * threads:
        need = tensor_parallel_size * threads
        raise DoolyError(f"{tensor_parallel_size} worker(s) x {threads} thread(s) need {need} cores; {len(cores)} here")
    if tensor_parallel_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            ",".join(str(c) for c in cores[k * threads:(k + 1) * threads]) for k in range(tensor_parallel_size))
    # the in-process worker (tp = 1) computes in this process's threads; torch's own setter, since an
    # engine started earlier in this process replaced torch.set_num_threads with a no-op
    torch._C.set_num_threads(threads)
    import vllm.envs
    from vllm import LLM

    # an engine started earlier in this process froze vLLM's view of the environment: read it anew
    vllm.envs.disable_envs_cache()

    folder = write_model_dir(config, Path(tempfile.mkdtemp(prefix="dooly-engine-")))
    try:
        with checkpoint_scale_weights(config.get("initializer_range", 0.02)):
            llm = LLM(model=str(folder), skip_tokenizer_init=True, load_format="dummy", dtype=dtype,
                      enforce_eager=True, **engine_kwargs)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    # vLLM may read the model folder again while the engine runs (e.g. generation_config.json for
    # default sampling parameters): it goes at `stop_engine`, or when the engine is collected or
    # the process exits, whichever comes first
    llm._dooly_remove_model_dir = weakref.finalize(llm, shutil.rmtree, folder, ignore_errors=True)
    return llm


@contextlib.contextmanager
def checkpoint_scale_weights(std: float, seed: int = 1234):
    """Inside the block, vLLM's dummy weights get the scale of a real model's.

    vLLM's dummy loader draws every tensor uniform in +-1e-3, norm weights included, so activations
    shrink layer after layer: the keys a tiny Llama writes to its KV cache average ~1e-6, a range no
    checkpoint produces. Kernels whose time depends on values then run paths a real deployment
    does not take (an FP8 KV-cache write here: 3x slower on values that small). After vLLM's own
    pass, and before its weight post-processing (packing), floating weights are drawn as transformers
    initialises a model: matrices normal with the config's `initializer_range`, norm weights 1,
    biases 0; scales and non-float tensors keep vLLM's values. In-process workers only: a TP>1
    engine's workers (their own processes) keep vLLM's dummy weights.
    """
    import torch
    from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader

    original = DummyModelLoader.load_weights

    @torch.no_grad()
    def load_weights(self, model, model_config):
        original(self, model, model_config)
        generator = torch.Generator().manual_seed(seed)
        for layer in model.modules():
            norm = "norm" in type(layer).__name__.lower()
            tensors = list(layer.named_parameters(recurse=False)) + [
                (n, b) for n, b in layer.named_buffers(recurse=False) if n not in layer._non_persistent_buffers_set]
            for name, t in tensors:
                if t.device.type == "meta" or not torch.is_floating_point(t) or "scale" in name:
                    continue
                if norm and name == "weight":
                    t.fill_(1.0)
                elif t.dim() >= 2:
                    t.copy_(torch.randn(t.shape, generator=generator) * std)
                else:
                    t.zero_()

    DummyModelLoader.load_weights = load_weights
    try:
        yield
    finally:
        DummyModelLoader.load_weights = original


# the process state start_engine changes (environment variables vLLM reads at start-up)
ENGINE_ENV = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND")


@contextlib.contextmanager
def running_engine(config: dict, dtype: str = "bfloat16", kv_cache_gib: int = 1, threads: int | None = None,
                   **engine_kwargs):
    """`start_engine` for the block, then `stop_engine`; after the block the process's environment
    variables and torch thread count are what they were before it (a later simulate in the same
    process sizes its KV cache as if no engine had run, a later TP engine binds its own cores), and
    `torch.set_num_threads` works again (vLLM's in-process worker turns it into a no-op)."""
    import torch

    saved_env = {k: os.environ.get(k) for k in ENGINE_ENV}
    saved_threads = torch.get_num_threads()
    llm = None
    try:
        llm = start_engine(config, dtype, kv_cache_gib, threads, **engine_kwargs)
        yield llm
    finally:
        if llm is not None:
            stop_engine(llm)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.set_num_threads = torch._C.set_num_threads  # vLLM's in-process worker made it a no-op
        torch.set_num_threads(saved_threads)


def stop_engine(llm) -> None:
    """Shut the engine down now (its TP worker processes included), not whenever it is collected,
    and remove the model folder `start_engine` wrote.

    The process-wide parallel groups stay: vLLM's in-process EngineCore destroys them on shutdown,
    but every in-process engine of this process shares them (vLLM reuses groups of the same sizes),
    so another engine still serving here would lose its pipeline group in mid-step."""
    import gc

    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        with _process_groups_kept():
            core.shutdown()
    remove_model_dir = getattr(llm, "_dooly_remove_model_dir", None)
    if remove_model_dir is not None:
        remove_model_dir()
    gc.collect()


@contextlib.contextmanager
def _process_groups_kept():
    """Inside the block, vLLM's engine shutdown does all its clean-up (environment cache, memory)
    except destroying the process-wide parallel groups and world."""
    from vllm.distributed import parallel_state as ps

    saved = ps.destroy_model_parallel, ps.destroy_distributed_environment
    ps.destroy_model_parallel = ps.destroy_distributed_environment = lambda *a, **k: None
    try:
        yield
    finally:
        ps.destroy_model_parallel, ps.destroy_distributed_environment = saved


def model_runner(llm):
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner


@contextlib.contextmanager
def _model_methods(model, forward, compute_logits):
    """Run the engine's model through wrappers of forward / compute_logits inside the block only."""
    model.forward, model.compute_logits = forward, compute_logits
    try:
        yield
    finally:
        del model.forward, model.compute_logits  # back to the class methods


@contextlib.contextmanager
def record_engine_model(llm):
    """Record every op the engine's model runs (forward + compute_logits) inside the block.

    Yields a list that receives one op list per model forward (one engine step).
    """
    with _recording(model_runner(llm)) as steps:
        yield steps


def _worker_start(wrapper) -> None:
    """Runs in each TP worker process: start recording its model's ops."""
    wrapper._dooly_rec = _recording(wrapper.worker.model_runner)
    wrapper._dooly_steps = wrapper._dooly_rec.__enter__()


def _worker_stop(wrapper) -> list:
    """Runs in each TP worker process: stop recording; its steps as plain (op, module, shapes, dtypes)."""
    wrapper._dooly_rec.__exit__(None, None, None)
    steps = wrapper._dooly_steps
    del wrapper._dooly_rec, wrapper._dooly_steps
    return [[(o.op, o.module, [tuple(int(d) for d in a.shape) for a in o.args if a.kind == "tensor"]
              + [tuple(int(d) for d in i.shape) for a in o.args if a.kind == "tensors" for i in a.items
                 if i.kind == "tensor"],
              [a.dtype for a in o.args if a.kind == "tensor"]) for o in ops] for ops in steps]


@contextlib.contextmanager
def record_all_ranks(llm):
    """Like `record_engine_model`, on every worker of a multi-process (TP) engine.

    Yields a list that, when the block ends, holds per rank its steps' op lists, each op as
    (op, module, tensor shapes, tensor dtypes)."""
    ranks: list = []
    llm.collective_rpc(_worker_start)
    try:
        yield ranks
    finally:
        ranks.extend(llm.collective_rpc(_worker_stop))


@contextlib.contextmanager
def _recording(runner):
    model = runner.model
    describe = attention_describer(runner.vllm_config)
    steps: list[list] = []
    forward, logits = model.forward, model.compute_logits

    def rec_forward(*args, **kwargs):
        with record_ops(model, describe) as rec:
            out = forward(*args, **kwargs)
        steps.append(rec.ops)
        return out

    def rec_logits(*args, **kwargs):
        with record_ops(model, describe) as rec:
            out = logits(*args, **kwargs)
        steps[-1] = steps[-1] + rec.ops
        return out

    with _model_methods(model, rec_forward, rec_logits):
        yield steps


@contextlib.contextmanager
def time_engine_model(llm):
    """Wall time of each model step (forward + compute_logits) and of its attention layers.

    Yields a list receiving one {"forward_s", "attention_s"} per engine step. Only the attention
    modules get hooks (two perf_counter calls each); the rest of the model runs untouched.
    """
    import time

    from vllm.model_executor.layers.attention.attention import Attention

    runner = model_runner(llm)
    model = runner.model
    steps: list[dict] = []
    state = {"attn": 0.0, "t": 0.0}
    forward, logits = model.forward, model.compute_logits

    def pre(_m, _a):
        state["t"] = time.perf_counter()

    def post(_m, _a, _o):
        state["attn"] += time.perf_counter() - state["t"]

    hooks = []
    for m in model.modules():
        if isinstance(m, Attention):
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

    def timed_forward(*args, **kwargs):
        state["attn"] = 0.0
        t0 = time.perf_counter()
        out = forward(*args, **kwargs)
        steps.append({"forward_s": time.perf_counter() - t0, "attention_s": state["attn"]})
        return out

    def timed_logits(*args, **kwargs):
        t0 = time.perf_counter()
        out = logits(*args, **kwargs)
        steps[-1]["forward_s"] += time.perf_counter() - t0
        return out

    try:
        with _model_methods(model, timed_forward, timed_logits):
            yield steps
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def time_engine_ops(llm):
    """Time every op the engine's model runs (forward + compute_logits) inside the block.

    Yields a list that receives one {op name: [total microseconds, calls]} per model step. Each op is
    timed around its own call (perf_counter), as the profiler times it in isolation; the recording's
    own Python runs between ops, so the ops' times are the engine's but the step's wall time is not.
    """
    from dooly.trace.recorder import OpTimer

    model = model_runner(llm).model
    steps: list[dict] = []
    forward, logits = model.forward, model.compute_logits

    def timed_forward(*args, **kwargs):
        with OpTimer() as timer:
            out = forward(*args, **kwargs)
        steps.append(timer.totals())
        return out

    def timed_logits(*args, **kwargs):
        with OpTimer() as timer:
            out = logits(*args, **kwargs)
        for op, (us, calls) in timer.totals().items():
            total = steps[-1].setdefault(op, [0.0, 0])
            total[0] += us
            total[1] += calls
        return out

    with _model_methods(model, timed_forward, timed_logits):
        yield steps


@contextlib.contextmanager
def scheduled_steps(llm):
    """Inside the block, every `schedule()` of the engine's own scheduler appends what it scheduled
    to the yielded list: (req_ids, Batch, preempted ids), or None for an empty step. Ids are the
    caller's: the engine's internal ids carry a suffix `-<8 hex chars>` (its input processor adds it)."""
    from dooly.records import Batch

    sched = llm.llm_engine.engine_core.engine_core.scheduler
    schedule = sched.schedule
    seen: list = []

    def recording(*args, **kwargs):
        out = schedule(*args, **kwargs)
        ids = list(out.num_scheduled_tokens)
        q = [out.num_scheduled_tokens[r] for r in ids]
        c = [sched.requests[r].num_computed_tokens - n for r, n in zip(ids, q)]
        ext = [r.rsplit("-", 1)[0] for r in ids]
        pre = sorted(r.rsplit("-", 1)[0] for r in out.preempted_req_ids or ())
        seen.append((ext, Batch(tuple(c), tuple(q)), pre) if ids else None)
        return out

    sched.schedule = recording
    try:
        yield seen
    finally:
        del sched.schedule


def _add(eng, index: int, r, vocab: int) -> None:
    from vllm import SamplingParams

    from dooly.sim.core import prompt_ids

    sp = SamplingParams(max_tokens=r.output_tokens, min_tokens=r.output_tokens, ignore_eos=True, temperature=0)
    eng.add_request(r.request_id, {"prompt_token_ids": prompt_ids(index, r.prompt_tokens, vocab)}, sp)


def record_engine_steps(llm, requests, vocab: int) -> list[tuple]:
    """Run `requests` (RequestSpec, all added before the first step) through the real engine.

    Returns one (Batch, wall seconds of `LLMEngine.step()`) per step that ran the model: the batch
    is read from the engine's own scheduler output, the time covers scheduling, the model, sampling
    and output processing, as a served step does.
    """
    import time

    eng = llm.llm_engine
    steps = []
    with scheduled_steps(llm) as seen:
        for i, r in enumerate(requests):
            _add(eng, i, r, vocab)
        while eng.has_unfinished_requests():
            seen.clear()
            t0 = time.perf_counter()
            eng.step()
            dt = time.perf_counter() - t0
            if seen and seen[-1] is not None:
                steps.append((seen[-1][1], dt))
    return steps


def serve(llm, requests, vocab: int):
    """Serve `requests` (RequestSpec) on the real engine with their arrival times honoured.

    The offline engine is driven step by step on the wall clock: a request is added once its
    arrival time has passed (so, like a served engine, it joins at the next step), the loop sleeps
    while idle. Returns (RequestResult per request in input order, StepResult per model step), both
    in seconds from the start, the same records the simulator produces; prompts are the simulator's
    token ids (`dooly.sim.core.prompt_ids`), so prefix-cache behaviour is the same.
    """
    import time

    from dooly.records import RequestResult, StepResult

    eng = llm.llm_engine
    if eng.has_unfinished_requests():
        raise RuntimeError("the engine still holds requests")
    order = sorted(range(len(requests)), key=lambda i: (requests[i].arrival_s, i))
    results = {r.request_id: RequestResult(r.request_id, r.arrival_s, r.prompt_tokens, r.output_tokens)
               for r in requests}
    steps = []
    k = 0
    with scheduled_steps(llm) as seen:
        t0 = time.perf_counter()
        while k < len(order) or eng.has_unfinished_requests():
            now = time.perf_counter() - t0
            while k < len(order) and requests[order[k]].arrival_s <= now:
                _add(eng, order[k], requests[order[k]], vocab)
                k += 1
            if not eng.has_unfinished_requests():
                time.sleep(max(0.0, requests[order[k]].arrival_s - now))
                continue
            seen.clear()
            start = time.perf_counter() - t0
            outputs = eng.step()
            end = time.perf_counter() - t0
            for o in outputs:
                res = results[o.request_id]
                new = len(o.outputs[0].token_ids) - len(res.token_times)  # cumulative outputs
                res.token_times.extend([end] * new)
            if seen and seen[-1] is not None:
                ids, batch, preempted = seen[-1]
                steps.append(StepResult(start, end, ids, batch, preempted))
    return [results[r.request_id] for r in requests], steps


def engine_settings(llm) -> dict:
    """The options a running engine actually uses (vLLM may lower what it was given) and its KV blocks."""
    cfg = llm.llm_engine.vllm_config
    sc = cfg.scheduler_config
    return {"max_num_batched_tokens": sc.max_num_batched_tokens, "max_num_seqs": sc.max_num_seqs,
            "enable_prefix_caching": bool(cfg.cache_config.enable_prefix_caching),
            "enable_chunked_prefill": bool(sc.enable_chunked_prefill),
            "num_gpu_blocks": cfg.cache_config.num_gpu_blocks}
