"""The `dooly` command line."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dooly.errors import DoolyError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Profile LLM operations once, reuse them across models, simulate serving.")
console = Console(width=200) if not sys.stdout.isatty() else Console()
err = Console(stderr=True)


def _fail(e: Exception) -> None:
    err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _trace(model: str, engine: str, tp: int, dtype: str):
    from dooly.catalog import resolve
    from dooly.trace import trace_model

    return trace_model(resolve(model), engine=engine, tp=tp, dtype=dtype)


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
    tp: int = typer.Option(1, "--tp", help="tensor-parallel degree (rank 0's ops are shown)"),
    dtype: str = typer.Option("bfloat16", help="bfloat16 | float16 | float32"),
    fmt: str = typer.Option("table", "--format", help="table | json"),
    all_ops: bool = typer.Option(False, "--all", help="table: also show views and other metadata-only ops"),
) -> None:
    """Trace one engine step and print every op with its dims labelled by origin."""
    if fmt not in ("table", "json"):
        _fail(DoolyError(f"unknown format {fmt!r}; formats: table, json"))
    try:
        t = _trace(model, engine, tp, dtype)
    except DoolyError as e:
        _fail(e)
    if fmt == "json":
        sys.stdout.write(json.dumps(t.to_json(), indent=1) + "\n")
        return
    from dooly.trace.records import is_metadata_op

    table = Table("op", "module", "phase", "count", "inputs (dims by origin)", "signature",
                  title=f"{t.model} on {t.engine_version}, tp={t.tp}, {t.dtype}")
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
    for note in t.notes:
        console.print(f"note: {note}", highlight=False)


@app.command()
def plan(
    models: Optional[list[str]] = typer.Argument(None, help="models in the order they would be profiled"),
    suite: Optional[str] = typer.Option(None, help="a named set from the catalog (see `dooly catalog`)"),
    engine: str = typer.Option("vllm"),
    tp: int = typer.Option(1, "--tp"),
    dtype: str = typer.Option("bfloat16"),
) -> None:
    """Show how many operation signatures each model shares with the ones before it."""
    from dooly.catalog import suite as suite_models
    from dooly.plan import plan as make_plan

    try:
        names = list(models or []) + (suite_models(suite) if suite else [])
        if not names:
            raise DoolyError("give models or --suite NAME")
        traces = [_trace(m, engine, tp, dtype) for m in names]
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


@app.command()
def quickstart(
    model: str = typer.Option("dooly/tiny-llama", help="model whose step is traced and shown"),
    suite: str = typer.Option("7b", help="catalog suite whose cross-model sharing is shown"),
) -> None:
    """The main job so far: trace one model's step, then show signature sharing across a suite."""
    console.rule(f"1. trace {model} on vLLM")
    trace(model=model, engine="vllm", tp=1, dtype="bfloat16", fmt="table", all_ops=False)
    console.rule(f"2. signatures shared across suite {suite!r}")
    plan(models=None, suite=suite, engine="vllm", tp=1, dtype="bfloat16")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
