"""The `dooly` command line."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from dooly.errors import DoolyError
from dooly.records import DEFAULT_OPTIONS, VLLM_MAX_NUM_SEQS, EngineOptions

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Profile LLM operations once, reuse them across models, simulate serving.")
# user text (paths, specs like uniform:100:10) is never rendered as emoji codes
console = Console(width=200, emoji=False) if not sys.stdout.isatty() else Console(emoji=False)
err = Console(stderr=True, emoji=False, highlight=False)

# exit statuses (README, "Exit codes")
EXIT_INCOMPLETE = 1  # the command ran but did not finish its work (ops it could not measure; an internal error)
EXIT_BAD_INPUT = 2  # bad input or missing data: nothing was written
EXIT_NO_CONFIGURATION = 3  # `dooly search` / `dooly capacity`: no configuration meets the SLO (the data was there)
EXIT_INTERRUPTED = 130  # Ctrl-C
INTERRUPTED = "interrupted: what was stored is kept (a profile resumes where it stopped when run again)"


def say_error(message: str) -> None:
    """The one way an error reaches the user: one line on stderr, its text as given (never read as
    markup or emoji codes)."""
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    err.print(Text.assemble(("error:", "red"), " ", line or "failed"), soft_wrap=True)


def _fail(e: Exception) -> None:
    say_error(str(e))
    raise typer.Exit(EXIT_BAD_INPUT)


def _trace(model: str, engine: str, tensor_parallel_size: int, dtype: str, attention_backend: str | None = None,
           kv_cache_dtype: str | None = None, quantization: str | None = None):
    from dooly.catalog import resolve
    from dooly.trace import trace_model

    return trace_model(
        resolve(model),
        engine=engine,
        tensor_parallel_size=tensor_parallel_size,
        dtype=dtype,
        attention_backend=attention_backend,
        kv_cache_dtype=kv_cache_dtype,
        quantization=quantization,
    )


_Q_HELP = ("weight quantization as vLLM's --quantization spells it (default: the checkpoint's own "
           "quantization_config, or none); e.g. compressed-tensors, awq, fp8")
_KVD_HELP_T = "KV-cache storage as vLLM spells it: auto | fp8 | fp8_e4m3 | fp8_e5m2 (changes the attention kernels)"
_KVD_HELP = "KV-cache storage as vLLM spells it: auto (the model's dtype) | fp8 | fp8_e4m3 | fp8_e5m2 (what the backend offers)"
_BACKEND_HELP = ("attention backend (vllm: CPU_ATTN here, FLASH_ATTN | FLASHINFER | TRITON_ATTN on GPUs; "
                 "hf: sdpa | eager | flex_attention | paged|sdpa | paged|eager); default: the engine's choice")


@app.command()
def catalog() -> None:
    """List the catalog's models and suites."""
    from dooly.catalog import catalog_ids, resolve, suites

    table = Table("model", "arch", "hidden", "layers", "heads/kv", "ffn", "vocab")
    for name in catalog_ids():
        c = resolve(name).config
        table.add_row(name, c["model_type"], str(c["hidden_size"]), str(c["num_hidden_layers"]),
                      f"{c['num_attention_heads']}/{c.get('num_key_value_heads', c['num_attention_heads'])}",
                      str(c.get("intermediate_size", "")), str(c["vocab_size"]))
    console.print(table)
    for name, members in suites().items():
        console.print(f"suite [bold]{name}[/bold]: {len(members)} models")


@app.command()
def trace(
    model: str = typer.Argument(..., help="HF id from the catalog, or a path to config.json / its folder"),
    engine: str = typer.Option("vllm", help="engine whose model code is traced: vllm | hf"),
    tensor_parallel_size: int = typer.Option(
        1, "--tensor-parallel-size", "--tp", help="tensor-parallel degree (rank 0's ops are shown)"
    ),
    dtype: str = typer.Option("bfloat16", help="bfloat16 | float16 | float32"),
    fmt: str = typer.Option("table", "--format", help="table | json"),
    all_ops: bool = typer.Option(False, "--all", help="table: also show views and other metadata-only ops"),
    attention_backend: Optional[str] = typer.Option(None, help=_BACKEND_HELP),
    kv_cache_dtype: str = typer.Option("auto", help=_KVD_HELP_T),
    quantization: Optional[str] = typer.Option(None, help=_Q_HELP),
) -> None:
    """Trace one engine step and print every op with its dims labelled by origin."""
    if fmt not in ("table", "json"):
        _fail(DoolyError(f"unknown format {fmt!r}; formats: table, json"))
    try:
        t = _trace(model, engine, tensor_parallel_size, dtype, attention_backend, kv_cache_dtype, quantization)
    except DoolyError as e:
        _fail(e)
    if fmt == "json":
        sys.stdout.write(json.dumps(t.to_json(), indent=1) + "\n")
        return
    from dooly.records import is_metadata_op

    table = Table("op", "module", "phase", "count", "inputs (dims by origin)", "signature",
                  title=f"{t.model} on {t.engine_version}, tp={t.tensor_parallel_size}, {t.dtype}")
    hidden = 0
    for g in t.groups():
        if not all_ops and is_metadata_op(g.op):
            hidden += g.count
            continue
        dims = "; ".join("[" + ", ".join(d) + "]" for a in g.args for d in a.tensor_dims())
        table.add_row(g.op, g.module, g.phase, str(g.count), escape(dims), g.signature[:8])
    console.print(table)
    console.print(f"{len(t.ops)} ops executed, {len(t.signatures())} signatures, "
                  f"{hidden} metadata-only ops hidden (--all shows them), unresolved dims: {t.unresolved}, "
                  f"traced in {t.seconds:.2f} s")
    if t.dispatch_key:
        console.print(f"kernels as dispatched on this CPU ({t.dispatch_key})", highlight=False)
    _print_not_profilable(t)
    for note in t.notes:
        console.print(f"note: {note}", highlight=False)


def _print_not_profilable(t) -> bool:
    """List the trace's ops this machine cannot measure; True when there are none."""
    from dooly.profile.profilable import not_profilable

    blocked = not_profilable(t)
    for sig, (op, why) in blocked.items():
        console.print(f"not profilable here: {op} [{sig[:8]}]: {why}", highlight=False)
    return not blocked


@app.command()
def env(
    model: Optional[str] = typer.Argument(None, help="also show where this model's GEMMs go here"),
    tensor_parallel_size: int = typer.Option(
        1, "--tensor-parallel-size", "--tp", help="tensor-parallel degree of the environment key"
    ),
    dtype: str = typer.Option("bfloat16", help="bfloat16 | float16 | float32"),
) -> None:
    """This machine's environment key (the one its measurements are stored under) and, given a model,
    the kernel each of its GEMMs is dispatched to here and whether every op is profilable here."""
    from dooly.engine_interface import get_engine
    from dooly.profile import current_environment, default_threads
    from dooly.trace.records import fold_layers

    eng = get_engine("vllm")
    try:
        if tensor_parallel_size < 1:
            raise DoolyError(f"--tp must be a positive integer, got {tensor_parallel_size}")
        e = current_environment(
            "vllm", eng.version(), dtype, default_threads(tensor_parallel_size), tensor_parallel_size
        )
        t = _trace(model, "vllm", tensor_parallel_size, dtype) if model else None
        dispatch = eng.dispatch_key()
    except DoolyError as ex:
        _fail(ex)
    table = Table("field", "value", title="environment key of this machine")
    for field_, value in (("device", e.device), ("CPU", e.device_name), ("ISA flags", e.isa or "-"),
                          ("AMX tiles", "yes" if "amx_tile=1" in dispatch else "no"),  # as vLLM sees them
                          ("kernel dispatch", dispatch), ("engine", e.engine_version),
                          ("torch", e.torch_version), ("dtype", e.dtype), ("threads", str(e.threads)),
                          ("binding", e.binding), ("timing method", e.timing)):
        table.add_row(field_, escape(str(value)))
    console.print(table)
    if t is None:
        return
    gemms = Table("module", "op", "kernel here", "dims by origin", title=f"GEMMs of {t.model} on this CPU")
    seen = set()
    for op in t.ops:
        key = (fold_layers(op.module), op.op)
        if op.op in eng.gemm_ops and key not in seen:
            seen.add(key)
            dims = "; ".join("[" + ", ".join(d) + "]" for a in op.args for d in a.tensor_dims())
            kernel = eng.kernel_name(op.op, [a.value for a in op.args if a.kind == "const"])
            gemms.add_row(key[0], op.op, kernel, escape(dims))
    console.print(gemms)
    if _print_not_profilable(t):
        console.print(f"every op of {t.model} is profilable here ({len(t.signatures())} signatures)")


@app.command()
def plan(
    models: Optional[list[str]] = typer.Argument(None, help="models in the order they would be profiled"),
    suite: Optional[str] = typer.Option(None, help="a named set from the catalog (see `dooly catalog`)"),
    engine: str = typer.Option("vllm"),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", "--tp", help="tensor-parallel degree"),
    dtype: str = typer.Option("bfloat16"),
    attention_backend: Optional[str] = typer.Option(None, help=_BACKEND_HELP),
    kv_cache_dtype: str = typer.Option("auto", help=_KVD_HELP_T),
    quantization: Optional[str] = typer.Option(None, help=_Q_HELP),
) -> None:
    """Show how many operation signatures each model shares with the ones before it."""
    from dooly.catalog import suite as suite_models
    from dooly.plan import plan as make_plan

    try:
        names = list(models or []) + (suite_models(suite) if suite else [])
        if not names:
            raise DoolyError("give models or --suite NAME")
        traces = [_trace(m, engine, tensor_parallel_size, dtype, attention_backend, kv_cache_dtype, quantization)
                  for m in names]
    except DoolyError as e:
        _fail(e)
    rows, unique = make_plan(traces)
    table = Table("model", "signatures", "shared with earlier", "new", "unresolved dims")
    for r in rows:
        table.add_row(r.model, str(r.signatures), str(r.shared), str(r.new), str(r.unresolved))
    console.print(table)
    total = sum(r.signatures for r in rows)
    console.print(f"unique signatures: {unique} of {total} per-model signatures "
                  f"({100 * (1 - unique / total):.1f}% shared)")


db_app = typer.Typer(no_args_is_help=True, help="Inspect the latency database.")
app.add_typer(db_app, name="db")

_TOKENS_HELP = "engine limit: tokens per step"
_SEQS_HELP = (f"engine limit: requests per step (default: vLLM's, {VLLM_MAX_NUM_SEQS} or --max-num-batched-tokens "
              "if smaller; dooly uses what vLLM makes of it)")
_KV_HELP = "KV-cache space of each engine worker, GiB (vLLM CPU's VLLM_CPU_KVCACHE_SPACE)"
_DB_HELP = "database URL (default: $DOOLY_DB, else SQLite at ~/.local/share/dooly/latency.db)"


def _check_limits(**limits: int) -> None:
    for name, value in limits.items():
        if value is not None and value <= 0:
            raise DoolyError(f"--{name.replace('_', '-')} must be > 0, got {value}")


@app.command()
def profile(
    models: Optional[list[str]] = typer.Argument(None, help="models to profile (HF ids or config paths)"),
    suite: Optional[str] = typer.Option(None, help="a named set from the catalog"),
    engine: str = typer.Option("vllm"),
    db: Optional[str] = typer.Option(None, "--db", help=_DB_HELP),
    dtype: str = typer.Option("bfloat16"),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", "--tp", help="tensor-parallel degree"),
    max_num_batched_tokens: int = typer.Option(DEFAULT_OPTIONS.max_num_batched_tokens,
                                               help="engine limit: tokens per step"),
    max_num_seqs: Optional[int] = typer.Option(DEFAULT_OPTIONS.max_num_seqs, help=_SEQS_HELP),
    grid: str = typer.Option("full", help="sweep grid: full | reduced"),
    threads: Optional[int] = typer.Option(None, help="threads to time with (default: what the engine uses)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan, measure nothing"),
    attention_backend: Optional[str] = typer.Option(None, help=_BACKEND_HELP),
    kv_cache_dtype: str = typer.Option("auto", help=_KVD_HELP_T),
    quantization: Optional[str] = typer.Option(None, help=_Q_HELP),
    ray_address: Optional[str] = typer.Option(
        None, help="split the missing points across the workers of this Ray cluster (HOST:PORT, ray://..., "
                   "auto; 'local' starts one here), all writing to --db (PostgreSQL for a multi-machine cluster)"),
) -> None:
    """Measure the operations of MODELS that the latency database does not hold yet."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dooly.catalog import suite as suite_models
    from dooly.profile import Limits
    from dooly.profile.stage import plan_models, profile as run

    try:
        _check_limits(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs, threads=threads)
        names = list(models or []) + (suite_models(suite) if suite else [])
        options = dict(
            engine=engine,
            db=db,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            grid=grid,
            threads=threads,
            # vLLM's default max_num_seqs is lowered to the token budget when that is smaller
            limits=Limits(max_num_batched_tokens=max_num_batched_tokens,
                          max_num_seqs=max_num_seqs or min(VLLM_MAX_NUM_SEQS, max_num_batched_tokens)),
            attention_backend=attention_backend,
            kv_cache_dtype=kv_cache_dtype,
            quantization=quantization,
        )
        if dry_run:
            plan_, _ = plan_models(names, create_db=False, **options)
    except DoolyError as e:
        _fail(e)
    if dry_run:
        missing = plan_.missing
        table = Table("op", "signature", "request vars", "points", "to measure", "models")
        for w in plan_.work:
            todo = sum(1 for p in w.points if (w.signature, p) not in plan_.stored)
            table.add_row(w.op, w.signature[:8], ",".join(w.variables) or "-", str(len(w.points)), str(todo),
                          str(len(w.models)))
        console.print(table)
        console.print(f"{len(plan_.work)} signatures, {len(missing)} points to measure, "
                      f"{sum(len(w.points) for w in plan_.work) - len(missing)} reused; "
                      f"{len(plan_.deferred)} signatures not profilable by this engine here; "
                      f"estimated {plan_.estimate_s():.0f} s of device time"
                      + ("" if plan_.scales else " (rough: no measurements here yet to scale the estimate by)"))
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("profiling", total=None)

        def tick(op, done, total):
            bar.update(task, completed=done, total=total, description=f"profiling {op}")

        try:
            summary, url = run(names, ray_address=ray_address, progress=tick, **options)
        except DoolyError as e:
            _fail(e)
    table = Table("", "value")
    table.add_row("models", str(len(summary.models)))
    table.add_row("signatures", f"{summary.signatures} ({summary.signatures_measured} profiled, "
                                f"{summary.signatures_reused} reused)")
    table.add_row("points", f"{summary.points_measured} measured, {summary.points_reused} reused"
                            + (f", {summary.points_resumed} kept from an unfinished run of these models"
                               if summary.points_resumed else ""))
    table.add_row("device-seconds spent", f"{summary.device_s:.1f}")
    table.add_row("without reuse (per-model profiler)", f"{summary.baseline_s:.1f}")
    table.add_row("saved", f"{summary.saved_pct:.1f}%")
    table.add_row("not profilable by this engine here", str(summary.deferred))
    console.print(table)
    for sig, reason in summary.failed.items():
        console.print(f"could not replay {sig[:8]}: {escape(reason)}", highlight=False)
    from dooly.db import redact

    console.print(f"database: {redact(url)}", highlight=False)
    if summary.failed:
        say_error(f"{len(summary.failed)} signatures could not be measured (listed above); the run is recorded as "
                  f"incomplete")
        raise typer.Exit(EXIT_INCOMPLETE)


@db_app.command("stats")
def db_stats(db: Optional[str] = typer.Option(None, "--db", help=_DB_HELP)) -> None:
    """Per environment: signatures, points and device-seconds stored."""
    from dooly.db import LatencyDB

    try:
        database = LatencyDB(db, create=False)
    except DoolyError as e:
        _fail(e)
    table = Table("env", "device", "engine", "dtype", "threads", "signatures", "points", "device-s", "runs")
    for r in database.stats():
        e = r["environment"]
        table.add_row(r["env"], f"{e.device_name} [{e.isa}]", e.engine_version, e.dtype, str(e.threads),
                      str(r["signatures"]), str(r["points"]), f"{r['device_s']:.1f}", str(r["runs"]))
    console.print(table)
    console.print(f"database: {database.shown_url}", highlight=False)


@db_app.command("runs")
def db_runs(db: Optional[str] = typer.Option(None, "--db", help=_DB_HELP)) -> None:
    """Every profiling run: when, what, how it ended, what it measured and reused.

    A run killed with its process stays "running" (nothing could mark it); a distributed run counts
    the points all its workers stored."""
    import datetime as dt

    from dooly.db import LatencyDB

    try:
        database = LatencyDB(db, create=False)
    except DoolyError as e:
        _fail(e)
    table = Table("run", "env", "models", "started (UTC)", "took s", "status", "measured", "reused", "device-s",
                  "saved")
    for r in database.runs():
        started = dt.datetime.fromtimestamp(r["started"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        took = f"{r['finished'] - r['started']:.0f}" if r["finished"] else "-"
        saved = f"{100 * (1 - r['device_s'] / r['baseline_s']):.1f}%" if r["baseline_s"] else "-"
        table.add_row(str(r["id"]), r["env"], ", ".join(json.loads(r["models"])), started, took, r["status"],
                      str(r["measured"]), str(r["reused"]), f"{r['device_s']:.1f}", saved)
    console.print(table)


@db_app.command("ls")
def db_ls(db: Optional[str] = typer.Option(None, "--db", help=_DB_HELP),
          env: Optional[str] = typer.Option(None, help="only this environment key")) -> None:
    """Every stored signature: op, number of points, latency range."""
    from dooly.db import LatencyDB

    try:
        database = LatencyDB(db, create=False)
    except DoolyError as e:
        _fail(e)
    table = Table("env", "signature", "op", "points", "min us", "max us")
    for r in database.listing(env):
        table.add_row(r["env"], r["signature"], r["op"], str(r["points"]), f"{r['min_us']:.1f}",
                      f"{r['max_us']:.1f}")
    console.print(table)


@app.command()
def simulate(
    model: str = typer.Argument(..., help="HF id from the catalog, or a path to config.json / its folder"),
    workload: str = typer.Option(
        ...,
        help="a CSV / bench-serve / ShareGPT file, or "
        "n=N,prompt=SPEC,output=SPEC,arrivals=burst|poisson:R|gamma:R:CV,seed=S",
    ),
    db: Optional[str] = typer.Option(None, "--db", help=_DB_HELP),
    dtype: str = typer.Option("bfloat16"),
    max_num_batched_tokens: int = typer.Option(DEFAULT_OPTIONS.max_num_batched_tokens, help=_TOKENS_HELP),
    max_num_seqs: Optional[int] = typer.Option(DEFAULT_OPTIONS.max_num_seqs, help=_SEQS_HELP),
    enable_prefix_caching: bool = typer.Option(True, "--enable-prefix-caching/--no-enable-prefix-caching"),
    enable_chunked_prefill: bool = typer.Option(True, "--enable-chunked-prefill/--no-enable-chunked-prefill"),
    kv_cache_gib: float = typer.Option(DEFAULT_OPTIONS.kv_cache_gib, help=_KV_HELP),
    kv_cache_dtype: str = typer.Option(DEFAULT_OPTIONS.kv_cache_dtype, help=_KVD_HELP),
    quantization: Optional[str] = typer.Option(None, help=_Q_HELP),
    num_gpu_blocks: Optional[int] = typer.Option(None, help="KV-cache blocks (default: what --kv-cache-gib gives)"),
    tensor_parallel_size: int = typer.Option(
        1, "--tensor-parallel-size", "--tp", help="TP degree (needs the model profiled with --tensor-parallel-size K)"
    ),
    out: Optional[str] = typer.Option(None, help="folder for requests.csv, steps.csv, summary.json (and plots)"),
    plot: bool = typer.Option(False, "--plot", help="with --out: latency CDFs and per-step plots (PNG)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Predict TTFT, TPOT, ITL, E2E and throughput of serving MODEL on vLLM for a workload."""
    from dooly.api import simulate as run

    try:
        options = EngineOptions(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                enable_prefix_caching=enable_prefix_caching,
                                enable_chunked_prefill=enable_chunked_prefill, kv_cache_gib=kv_cache_gib,
                                kv_cache_dtype=kv_cache_dtype, quantization=quantization)
        res = run(model, workload, db=db, dtype=dtype, tensor_parallel_size=tensor_parallel_size, options=options,
                  num_gpu_blocks=num_gpu_blocks)
    except DoolyError as e:
        _fail(e)
    if out:
        from dooly.sim.run import write_simulation

        write_simulation(res, out, plot)
    if as_json:
        sys.stdout.write(res.summary.to_json(orient="records") + "\n")
        return
    table = Table("metric", "mean", "p50", "p90", "p99", title=f"{model}: {len(res.requests)} requests, "
                                                               f"{len(res.steps)} steps")
    for _, r in res.summary.iterrows():
        latency = r["metric"] in ("ttft_s", "tpot_s", "itl_s", "e2e_s")
        fmt = (lambda v: f"{1e3 * v:.1f} ms") if latency else (lambda v: f"{v:.2f}")
        name = r["metric"].removesuffix("_s") if latency else r["metric"].replace("_per_s", "/s")
        table.add_row(name, *[fmt(r[c]) if r[c] == r[c] else "" for c in ("mean", "p50", "p90", "p99")])
    console.print(table)
    if out:
        console.print(f"wrote {out}/requests.csv, steps.csv, summary.json" + (" and plots" if plot else ""))


@app.command()
def serve(
    model: str = typer.Argument(..., help="HF id from the catalog, or a path to config.json / its folder"),
    db: Optional[str] = typer.Option(None, "--db", help=_DB_HELP),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port to listen on"),
    tokenizer: Optional[str] = typer.Option(None, help="a tokenizer.json (or its folder) to count prompt tokens "
                                            "exactly, or 'words' (the catalog's word tokenizer: `dooly export "
                                            "tokenizer`); default: approximate, 4 characters per token"),
    served_model_name: Optional[list[str]] = typer.Option(None, help="name(s) clients use (default: MODEL)"),
    dtype: str = typer.Option("bfloat16"),
    max_num_batched_tokens: int = typer.Option(DEFAULT_OPTIONS.max_num_batched_tokens, help=_TOKENS_HELP),
    max_num_seqs: Optional[int] = typer.Option(DEFAULT_OPTIONS.max_num_seqs, help=_SEQS_HELP),
    enable_prefix_caching: bool = typer.Option(True, "--enable-prefix-caching/--no-enable-prefix-caching"),
    enable_chunked_prefill: bool = typer.Option(True, "--enable-chunked-prefill/--no-enable-chunked-prefill"),
    kv_cache_gib: float = typer.Option(DEFAULT_OPTIONS.kv_cache_gib, help=_KV_HELP),
    kv_cache_dtype: str = typer.Option(DEFAULT_OPTIONS.kv_cache_dtype, help=_KVD_HELP),
    quantization: Optional[str] = typer.Option(None, help=_Q_HELP),
    num_gpu_blocks: Optional[int] = typer.Option(None, help="KV-cache blocks (default: what --kv-cache-gib gives)"),
    tensor_parallel_size: int = typer.Option(
        1, "--tensor-parallel-size", "--tp", help="TP degree (needs the model profiled with --tensor-parallel-size K)"
    ),
    drain_timeout: float = typer.Option(30.0, help="on SIGINT/SIGTERM: seconds to let requests in flight finish "
                                        "(new ones get 503); a second signal exits at once"),
) -> None:
    """An OpenAI-compatible endpoint that answers like MODEL served by vLLM, at the predicted speed."""
    from dooly.deployment import Deployment
    from dooly.serve import prepare, run

    try:
        options = EngineOptions(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                enable_prefix_caching=enable_prefix_caching,
                                enable_chunked_prefill=enable_chunked_prefill, kv_cache_gib=kv_cache_gib,
                                kv_cache_dtype=kv_cache_dtype, quantization=quantization)
        d = Deployment.resolve(model, dtype=dtype, tensor_parallel_size=tensor_parallel_size, options=options,
                               num_blocks=num_gpu_blocks)
        served = prepare(model, db=db, deployment=d, tokenizer=tokenizer, served_model_name=served_model_name)

        def ready(url: str) -> None:
            err.print(Text(f"dooly serve: {model} on {url} (simulated: {d.num_blocks} KV blocks, max_num_seqs "
                           f"{d.max_num_seqs}, max_num_batched_tokens {d.settings['max_num_batched_tokens']}; "
                           f"prompt token counts {served.counter.source})"), soft_wrap=True)

        run(served, host=host, port=port, drain_s=drain_timeout, ready=ready)
    except DoolyError as e:
        _fail(e)


@app.command()
def calibrate(
    db: Optional[str] = typer.Option(None, "--db", help=_DB_HELP),
    models: str = typer.Option(
        ",".join(("dooly/tiny-llama", "dooly/tiny-llama-deep")), help="comma-separated small models of different depths"
    ),
    dtype: str = typer.Option("bfloat16"),
    tensor_parallel_size: int = typer.Option(
        1, "--tensor-parallel-size", "--tp", help="calibrate the engine running K TP workers"
    ),
) -> None:
    """Time the real engine's ops inside its steps (in-engine/isolated ratio per op family and size) and its
    per-step overhead outside the ops, here; store both."""
    from dooly.api import calibrate as run

    try:
        samples = run(db, tuple(m for m in models.split(",") if m), dtype,
                      tensor_parallel_size=tensor_parallel_size)
    except DoolyError as e:
        _fail(e)
    curves = samples.attrs.get("in_engine", {})
    if curves:
        sizes = sorted({n for c in curves.values() for n, *_ in c})
        ratios = Table("op family", *[f"{n} tok" for n in sizes],
                       title="in-engine time / isolated prediction, median per step size (p25-p75)")
        for family, c in curves.items():
            at = {n: f"{r:.2f} ({lo:.2f}-{hi:.2f})" for n, r, lo, hi, *_ in c}
            ratios.add_row(family, *[at.get(n, "") for n in sizes])
        console.print(ratios)
    table = Table("model", "steps", "median measured ms", "median ops ms (ratios applied)", "median overhead ms")
    for name, g in samples.groupby("model"):
        table.add_row(name, str(len(g)), f"{g['measured_us'].median() / 1e3:.2f}",
                      f"{g['ops_us'].median() / 1e3:.2f}", f"{g['overhead_us'].median() / 1e3:.2f}")
    console.print(table)


@app.command()
def validate(
    model: str = typer.Argument(..., help="HF id from the catalog, or a path to config.json / its folder"),
    workload: list[str] = typer.Option(..., help="a workload file or synthetic spec (as for simulate); repeatable"),
    db: Optional[str] = typer.Option(None, "--db", help=_DB_HELP),
    dtype: str = typer.Option("bfloat16"),
    max_num_batched_tokens: int = typer.Option(DEFAULT_OPTIONS.max_num_batched_tokens, help=_TOKENS_HELP),
    max_num_seqs: Optional[int] = typer.Option(DEFAULT_OPTIONS.max_num_seqs, help=_SEQS_HELP),
    enable_prefix_caching: bool = typer.Option(True, "--enable-prefix-caching/--no-enable-prefix-caching"),
    enable_chunked_prefill: bool = typer.Option(True, "--enable-chunked-prefill/--no-enable-chunked-prefill"),
    kv_cache_gib: float = typer.Option(
        1.0,
        help="the real engine's KV-cache space per worker, GiB (the simulator " "gets the blocks the engine reports)",
    ),
    kv_cache_dtype: str = typer.Option(DEFAULT_OPTIONS.kv_cache_dtype, help=_KVD_HELP),
    quantization: Optional[str] = typer.Option(None, help=_Q_HELP),
    tensor_parallel_size: int = typer.Option(
        1, "--tensor-parallel-size", "--tp", help="TP degree: the engine runs one worker per core"
    ),
    repeats: int = typer.Option(3, help="engine runs per workload (after one warm-up); their spread is shown"),
    out: Optional[str] = typer.Option(None, help="folder for the raw measured and predicted data and plots"),
    as_json: bool = typer.Option(False, "--json", help="print the headline errors as JSON"),
    split_ops: bool = typer.Option(False, "--split-ops", help="one more run per workload with every op timed in the "
                                   "engine: the error per step type and op family (TP=1)"),
) -> None:
    """Run the real engine and the simulator on the same workload; print measured vs predicted."""
    from dooly.validate import validate as run, write_validation

    try:
        options = EngineOptions(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                enable_prefix_caching=enable_prefix_caching,
                                enable_chunked_prefill=enable_chunked_prefill, kv_cache_gib=kv_cache_gib,
                                kv_cache_dtype=kv_cache_dtype, quantization=quantization)
        results = run(model, workload, db=db, dtype=dtype, repeats=repeats, options=options,
                      tensor_parallel_size=tensor_parallel_size, split_ops=split_ops,
                      progress=lambda msg: err.print(f"[dim]{escape(msg)}[/dim]"))
    except DoolyError as e:
        _fail(e)
    if out:
        write_validation(results, out)
    if as_json:
        sys.stdout.write(json.dumps([{"workload": v.workload, **v.headline()} for v in results]) + "\n")
        return
    for v in results:
        table = Table("metric", "stat", "measured", "run spread", "predicted", "error",
                      title=f"{model}: {v.workload} ({len(v.measured)} engine runs)")
        for _, r in v.metrics.iterrows():
            table.add_row(r["metric"].removesuffix("_s"), r["stat"], f"{1e3 * r['measured']:.2f} ms",
                          f"{100 * r['spread']:.1f}%", f"{1e3 * r['predicted']:.2f} ms", f"{100 * r['ape']:.1f}%")
        console.print(table)
        pr = v.per_request
        console.print(f"per-request MAPE: TTFT {100 * pr['ttft']:.1f}%  TPOT {100 * pr['tpot']:.1f}%  "
                      f"E2E {100 * pr['e2e']:.1f}% | batch composition match {100 * v.match_rate:.0f}% of steps")
        h = v.headline()
        flags = [m.upper() for m in ("ttft", "tpot") if h[f"inconclusive_{m}"]]
        console.print(f"machine time now / when profiled: {h['time_ratio']:.2f} (probes {h['time_ratio_min']:.2f}-"
                      f"{h['time_ratio_max']:.2f}) | noise floor (engine run spread) TTFT {100 * h['spread_ttft']:.1f}%"
                      f"  TPOT {100 * h['spread_tpot']:.1f}% | speed-corrected per-request MAPE: TTFT "
                      f"{100 * h['ttft_mape_corrected']:.1f}%  TPOT {100 * h['tpot_mape_corrected']:.1f}%"
                      + (f" | inconclusive at 5%: {', '.join(flags)} (noise floor above it)" if flags else ""),
                      highlight=False)
        steps = Table("step type", "steps", "measured ms", "predicted ms", "MAPE", "mean signed error",
                      "predicted: stateless / attention / overhead ms")
        for _, r in v.step_types.iterrows():
            split = " / ".join(f"{r.get(k, 0):.2f}" for k in ("stateless_ms", "stateful_ms", "overhead_ms"))
            steps.add_row(r["type"], str(r["steps"]), f"{r['measured_ms']:.2f}", f"{r['predicted_ms']:.2f}",
                          f"{100 * r['mape']:.1f}%", f"{100 * r['mean_signed_err']:+.1f}%", split)
        console.print(steps)
        if len(v.op_split):
            split = Table("step type", "op family", "steps", "in engine ms", "predicted ms", "signed error",
                          title="where the error sits (one run with its ops timed; rest = measured step - its ops)")
            for _, r in v.op_split.iterrows():
                split.add_row(r["type"], "rest" if r["family"] == "overhead" else r["family"], str(r["steps"]),
                              f"{r['in_engine_ms']:.3f}", f"{r['predicted_ms']:.3f}", f"{100 * r['signed_err']:+.1f}%")
            console.print(split)
    if out:
        console.print(f"wrote {out}/")


QUICK_WORKLOAD = "n=200,prompt=uniform:32:512,output=uniform:16:128,arrivals=poisson:4,seed=0"


@app.command()
def quickstart(
    model: str = typer.Option("dooly/tiny-llama", help="the small model to trace, profile and simulate"),
    sibling: str = typer.Option("dooly/tiny-llama-deep", help="a model of the same family (reuse is shown)"),
    workload: str = typer.Option(QUICK_WORKLOAD, help="the workload to simulate"),
    db: Optional[str] = typer.Option(None, "--db", help=_DB_HELP),
    out: str = typer.Option("dooly-quickstart", help="folder for the simulation's tables and plots"),
) -> None:
    """The whole pipeline on the embedded database: trace, profile (with reuse), calibrate, simulate."""
    import time

    start = time.perf_counter()
    console.rule(f"1. trace one engine step of {model} (vLLM's own model code, fake weights)")
    _invoke(trace, model=model, fmt="table")
    console.rule(f"2. profile what the latency database lacks for {model}")
    _invoke(profile, models=[model], db=db, grid="reduced")
    console.rule(f"3. profile {sibling}: same family, other depth -> its operations are already measured")
    _invoke(profile, models=[sibling], db=db, grid="reduced")
    console.rule("4. the engine's per-step overhead (scheduler, sampling, Python between ops)")
    from dooly.api import calibrated

    if calibrated(db):
        console.print("already calibrated in this environment: reused")
    else:
        _invoke(calibrate, db=db, models=f"{model},{sibling}")
    console.rule(f"5. simulate serving {model} on vLLM: {workload}")
    _invoke(simulate, model=model, workload=workload, db=db, out=out, plot=True)
    console.print(f"plots: {out}/latency_cdfs.png, {out}/steps.png | quickstart took "
                  f"{time.perf_counter() - start:.0f} s")
    console.print(f"next: dooly validate {model} --workload '{workload}' (the real engine vs this prediction)")


def _filled(command, **given) -> dict:
    """The arguments of a direct call to a CLI command: `given`, and every other parameter's default
    (typer keeps an option's default inside its OptionInfo, which a direct call would pass as is)."""
    import inspect

    from typer.models import ParameterInfo

    kw = {}
    for name, p in inspect.signature(command).parameters.items():
        if name in given:
            kw[name] = given[name]
        else:
            default = p.default.default if isinstance(p.default, ParameterInfo) else p.default
            if default is ...:
                raise TypeError(f"{command.__name__}: {name} is required")
            kw[name] = default
    return kw


def _invoke(command, **given):
    return command(**_filled(command, **given))


export_app = typer.Typer(no_args_is_help=True, help="Write dooly's predictions in other simulators' formats.")
app.add_typer(export_app, name="export")


@export_app.command("vidur")
def export_vidur(
    model: str = typer.Argument(..., help="HF id from the catalog, or a path to config.json / its folder"),
    out: str = typer.Option(..., "--out", help="new folder for the files (written whole or not at all)"),
    engine: str = typer.Option("vllm", help="engine whose ops fill the files (vllm)"),
    db: Optional[str] = typer.Option(None, "--db", help=_DB_HELP),
    dtype: str = typer.Option("bfloat16"),
    max_num_batched_tokens: int = typer.Option(
        DEFAULT_OPTIONS.max_num_batched_tokens, help="engine limit: tokens per step (grid and Vidur chunk)"
    ),
    max_num_seqs: Optional[int] = typer.Option(
        DEFAULT_OPTIONS.max_num_seqs, help=_SEQS_HELP + " (grid and Vidur batch cap)"
    ),
    kv_cache_gib: float = typer.Option(DEFAULT_OPTIONS.kv_cache_gib, help=_KV_HELP),
    kv_cache_dtype: str = typer.Option(DEFAULT_OPTIONS.kv_cache_dtype, help=_KVD_HELP),
    quantization: Optional[str] = typer.Option(None, help=_Q_HELP),
    device: str = typer.Option("cpu", help="Vidur device / node SKU name the files are filed under"),
    tensor_parallel_size: int = typer.Option(
        1,
        "--tensor-parallel-size",
        "--tp",
        help="describe one of K workers, plus all_reduce.csv " "(from a `dooly profile --tp K` database)",
    ),
) -> None:
    """Vidur's profile files (mlp.csv, attention.csv; all_reduce.csv at TP > 1) for MODEL, from the latency database."""
    from dooly.export import export_vidur as run

    try:
        if engine != "vllm":
            raise DoolyError(f"engine {engine!r} cannot be exported to Vidur; engines: vllm")
        options = EngineOptions(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                kv_cache_gib=kv_cache_gib, kv_cache_dtype=kv_cache_dtype, quantization=quantization)
        res = run(model, out, db=db, dtype=dtype, options=options, device=device,
                  tensor_parallel_size=tensor_parallel_size)
    except DoolyError as e:
        _fail(e)
    m = res.manifest
    for name, info in m["files"].items():
        console.print(f"{name}: {info['rows']} rows; extrapolated rows per op: {info['extrapolated_rows']}",
                      highlight=False)
    for x in m["not_filled"]:
        console.print(f"not filled: {x['what']} ({x['reason']})", highlight=False, soft_wrap=True)
    for x in m["not_represented"]:
        console.print(f"not represented in Vidur: {x['count']}x {x['op']} in {x['module']} ({x['reason']})",
                      highlight=False, soft_wrap=True)
    console.print(f"wrote {res.folder} (manifest.json, README.md); run Vidur (PyPI vidur=={m['vidur']['version']}) "
                  f"with workload flags in place of WORKLOAD_FLAGS:", highlight=False)
    sys.stdout.write(res.command + "\n")


_SLO_HELP = "targets METRIC_STAT=VALUE joined by commas (ttft|tpot|itl|e2e x mean|p50|p90|p99, ms|s), " \
            "e.g. ttft_p99=500ms,tpot_p99=50ms"
_GRID_HELP = "engine option NAME=V1,V2 as vLLM spells it (max_num_seqs, max_num_batched_tokens, " \
             "enable_chunked_prefill, enable_prefix_caching, attention_backend, dtype, tensor_parallel_size, " \
             "kv_cache_gib: KV space per worker, GiB); " \
             "repeatable; default: max_num_seqs=64,128,256 x max_num_batched_tokens=1024,2048,4096"
_SEARCH_WORKLOAD_HELP = "a workload file or synthetic spec (as for simulate): its request lengths are served, " \
                        "its arrivals replaced by seeded Poisson arrivals at each rate tried"


@export_app.command("tokenizer")
def export_tokenizer(
    model: str = typer.Argument(..., help="HF id from the catalog, or a path to config.json / its folder"),
    out: str = typer.Option(..., "--out", help="folder for tokenizer.json and tokenizer_config.json"),
) -> None:
    """A local tokenizer for MODEL whose counts are exact (one word, one token), for `vllm serve
    --tokenizer`, `vllm bench serve --tokenizer` and `dooly serve --tokenizer`: no download."""
    from dooly.catalog import resolve
    from dooly.catalog.tokenizer import write_tokenizer

    try:
        spec = resolve(model)
        folder = Path(out)
        if folder.exists() and any(folder.iterdir()):
            raise DoolyError(f"--out {out} exists and is not empty")
        try:
            write_tokenizer(spec.config, folder)
        except (KeyError, ValueError) as e:
            raise DoolyError(f"{model}: cannot build its word tokenizer ({e})") from None
    except DoolyError as e:
        _fail(e)
    console.print(Text(f"wrote {folder}/tokenizer.json ({spec.config['vocab_size']} words w0..w"
                       f"{spec.config['vocab_size'] - 1}, specials named)"))


def _run_search(models, workload, slo, grid, db, requests, rate_min, rate_max, tolerance, seed, ray_address,
                no_ray):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dooly.search import search as run

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("configurations", total=None)
        return run(models, workload, slo, grid or None, db=db, requests=requests, rate_min=rate_min,
                   rate_max=rate_max, tolerance=tolerance, seed=seed, use_ray=False if no_ray else None,
                   ray_address=ray_address, progress=lambda done, total: bar.update(task, completed=done, total=total))


def _no_configuration(res, what: str) -> None:
    """No configuration met the SLO: status 3 only when every configuration had its data; else the
    verdict is unknown, and the missing data is the error (status 2)."""
    from dooly.search.core import missing_data

    missing = missing_data(res)
    if missing is not None:
        say_error(f"{what} with data meets the SLO {res.slo}, and {missing}")
        raise typer.Exit(EXIT_BAD_INPUT)
    say_error(f"{what} meets the SLO {res.slo}")
    raise typer.Exit(EXIT_NO_CONFIGURATION)


def _ms(v) -> str:
    return f"{1e3 * v:.1f}" if v == v else ""


@app.command("search")
def search_configurations(
    models: list[str] = typer.Argument(..., help="models (HF ids from the catalog or config paths)"),
    workload: str = typer.Option(..., help=_SEARCH_WORKLOAD_HELP),
    slo: str = typer.Option(..., help=_SLO_HELP),
    grid: Optional[list[str]] = typer.Option(None, "--grid", help=_GRID_HELP),
    db: Optional[str] = typer.Option(None, "--db", help=_DB_HELP),
    requests: Optional[int] = typer.Option(None, help="serve only the workload's first N requests"),
    rate_min: float = typer.Option(0.05, help="lowest request rate tried (requests/s)"),
    rate_max: float = typer.Option(1000.0, help="highest request rate tried (requests/s)"),
    tolerance: float = typer.Option(0.05, help="goodput resolution: neighbouring rates tried differ by this ratio"),
    seed: int = typer.Option(0, help="seed of the Poisson arrivals"),
    ray_address: Optional[str] = typer.Option(None, help="run on this Ray cluster (HOST:PORT, ray://..., auto)"),
    no_ray: bool = typer.Option(False, "--no-ray", help="run in this process (default: a local Ray instance "
                                                         "when Ray is installed)"),
    top: int = typer.Option(20, help="table rows shown (every row goes to --out / --json)"),
    out: Optional[str] = typer.Option(None, help="folder for configs.csv, rates.csv, search.json (and pareto.png)"),
    plot: bool = typer.Option(False, "--plot", help="with --out: Pareto plot, goodput per device vs latency"),
    as_json: bool = typer.Option(False, "--json", help="print the configurations (best first) as JSON"),
) -> None:
    """Goodput of every configuration (model x engine options): the highest request rate meeting the SLO.

    Exit status: 0 when some configuration meets the SLO, 3 when none does, 2 on an error."""
    from dooly.search.core import write_outputs

    try:
        res = _run_search(models, workload, slo, grid, db, requests, rate_min, rate_max, tolerance, seed,
                          ray_address, no_ray)
    except DoolyError as e:
        _fail(e)
    if out:
        write_outputs(res, out, plot)
    best = res.best
    if as_json:
        doc = {"slo": str(res.slo), "best": None if best is None else best["config"],
               "configs": json.loads(res.configs.to_json(orient="records"))}
        sys.stdout.write(json.dumps(doc) + "\n")
    else:
        stats = [f"{t.name}_s" for t in res.slo.targets]
        table = Table("#", "configuration", "status", "goodput req/s", "per device", *[f"{s[:-2]} ms" for s in stats],
                      "rates tried", title=f"SLO {res.slo}: {len(res.configs)} configurations, best first")
        for i, r in res.configs.head(top).iterrows():
            table.add_row(str(i + 1), escape(r["config"]), r["status"], f"{r['goodput_rps']:.4g}",
                          f"{r['goodput_per_device_rps']:.4g}", *[_ms(r[s]) for s in stats], str(r["simulations"]))
        console.print(table)
        counts = res.configs["status"].value_counts()
        console.print(", ".join(f"{n} {s}" for s, n in counts.items()) + f" | {res.simulated} simulations run for "
                      f"{len(res.rates)} rates tried | {res.seconds:.1f} s, {res.ran_on}", highlight=False)
        for cmd in dict.fromkeys(res.configs.loc[res.configs["status"] == "missing", "reason"]):
            console.print(f"missing data; fill it with: {cmd}", highlight=False, soft_wrap=True)
        if out:
            console.print(f"wrote {out}/configs.csv, rates.csv, search.json" + (", pareto.png" if plot else ""))
    if best is None:
        _no_configuration(res, "no configuration")


@app.command()
def capacity(
    model: str = typer.Argument(..., help="HF id from the catalog, or a path to config.json / its folder"),
    rate: float = typer.Option(..., help="request rate to serve (requests/s)"),
    workload: str = typer.Option(..., help=_SEARCH_WORKLOAD_HELP),
    slo: str = typer.Option(..., help=_SLO_HELP),
    grid: Optional[list[str]] = typer.Option(None, "--grid", help=_GRID_HELP),
    db: Optional[str] = typer.Option(None, "--db", help=_DB_HELP),
    requests: Optional[int] = typer.Option(None, help="serve only the workload's first N requests"),
    rate_min: float = typer.Option(0.05, help="lowest request rate tried (requests/s)"),
    rate_max: float = typer.Option(1000.0, help="highest request rate tried (requests/s)"),
    tolerance: float = typer.Option(0.05, help="goodput resolution: neighbouring rates tried differ by this ratio"),
    seed: int = typer.Option(0, help="seed of the Poisson arrivals"),
    ray_address: Optional[str] = typer.Option(None, help="run on this Ray cluster (HOST:PORT, ray://..., auto)"),
    no_ray: bool = typer.Option(False, "--no-ray", help="run in this process"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
) -> None:
    """Replicas and devices to serve RATE under the SLO, with the configuration of most goodput per device.

    Exit status: 0 with a plan, 3 when no configuration meets the SLO, 2 on an error."""
    from dooly.search.core import missing_data, plan_capacity

    try:
        if not rate > 0:
            raise DoolyError(f"--rate must be > 0 requests/s, got {rate}")
        res = _run_search([model], workload, slo, grid, db, requests, rate_min, rate_max, tolerance, seed,
                          ray_address, no_ray)
        plan = plan_capacity(res, rate)
    except DoolyError as e:
        _fail(e)
    if plan is None:
        if as_json and missing_data(res) is None:
            sys.stdout.write(json.dumps({"slo": str(res.slo), "rate_rps": rate, "plan": None}) + "\n")
        _no_configuration(res, f"no configuration of {model}")
    if as_json:
        sys.stdout.write(json.dumps({"slo": str(res.slo), **json.loads(plan.to_json(orient="records"))[0]}) + "\n")
        return
    p = plan.iloc[0]
    at_least = "at least " if p["goodput_is_lower_bound"] else ""
    table = Table("", "value", title=f"{model} at {rate:g} requests/s under {res.slo}")
    table.add_row("configuration", escape(p["config"]))
    table.add_row("goodput per replica", f"{at_least}{p['goodput_rps']:.4g} requests/s "
                                         f"(tensor_parallel_size={p['tensor_parallel_size']})")
    table.add_row("replicas", f"{p['replicas']} = ceil({rate:g} / {p['goodput_rps']:.4g})")
    table.add_row("devices", f"{p['devices']} = {p['replicas']} x {p['tensor_parallel_size']}")
    table.add_row("margin", f"{100 * p['margin']:.1f}% (replicas x goodput / rate - 1)")
    console.print(table)
    console.print(f"{len(res.configs)} configurations searched in {res.seconds:.1f} s, {res.ran_on}", highlight=False)
    missing = missing_data(res)
    if missing:
        console.print(f"not searched: {missing}", highlight=False, soft_wrap=True)


def main() -> None:
    """The `dooly` entry point: every way a command can fail ends in one line on stderr and the
    exit statuses above; DOOLY_DEBUG=1 shows the traceback of an internal error."""
    if not sys.warnoptions:  # libraries' deprecation notes are not the user's to read (workers inherit it)
        warnings.simplefilter("ignore")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
    said = False
    try:
        code = app(standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):
        say_error(INTERRUPTED)
        code, said = EXIT_INTERRUPTED, True
    except DoolyError as e:  # raised outside a command's own handling
        say_error(str(e))
        code = EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # click's usage errors (typer's own click)
            ctx = getattr(e, "ctx", None)
            where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            if e.format_message():  # (no arguments: the help was the answer)
                say_error(e.format_message() + where)
            code = EXIT_BAD_INPUT
        elif os.environ.get("DOOLY_DEBUG"):
            raise
        else:  # a bug: one line, the traceback on request
            say_error(f"internal error: {type(e).__name__}: {e} (DOOLY_DEBUG=1 shows the traceback)")
            code = EXIT_INCOMPLETE
    if code == EXIT_INTERRUPTED and not said:  # typer turns Ctrl-C inside a command into this status
        say_error(INTERRUPTED)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
