"""Every failure is one honest line: bad or unusual input, run as a real `dooly` subprocess.

Each row checks the exit status, exactly one line on stderr (starting `error:` and naming the
problem), no traceback anywhere, the database byte-identical (sha256) or never created, and no
`dooly-*` folder left in the process's temporary folder. Exit statuses: 2 bad input or missing data,
3 "no configuration meets the SLO" (only with the data there), 130 interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DOOLY = str(Path(sys.executable).parent / "dooly")
WL = "n=4,prompt=uniform:32:64,output=uniform:4:8,arrivals=burst"


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    lines: list = field(default_factory=list)  # non-empty stderr lines


def dooly(*args: str, tmp: Path, timeout: float = 600) -> Run:
    """The real CLI in a subprocess, with its own temporary folder (checked for leftovers)."""
    tmpdir = tmp / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmpdir), OMP_NUM_THREADS="1")
    env.pop("DOOLY_DEBUG", None)
    p = subprocess.run([DOOLY, *args], capture_output=True, text=True, env=env, timeout=timeout)
    left = sorted(x.name for x in tmpdir.iterdir() if x.name.startswith("dooly-"))
    assert not left, f"temporary folders left behind: {left}"
    return Run(p.returncode, p.stdout, p.stderr, [x for x in p.stderr.splitlines() if x.strip()])


def one_error(r: Run, rc: int, *needles: str) -> str:
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-2000:]
    assert r.rc == rc, (r.rc, r.stderr[-2000:])
    assert len(r.lines) == 1, r.lines
    line = r.lines[0]
    assert line.startswith("error: "), line
    for n in needles:
        assert n in line, (n, line)
    return line


@pytest.fixture(scope="module")
def good(profiled, tmp_path_factory) -> Path:
    """A profiled database file (the tiny Llama, reduced grid), copied whole (SQLite's backup API)."""
    db, _ = profiled
    path = tmp_path_factory.mktemp("bad-input") / "good.db"
    src, dst = sqlite3.connect(db.url.split(":///", 1)[1]), sqlite3.connect(path)
    with dst:
        src.backup(dst)
    src.close()
    dst.close()
    return path


@pytest.fixture
def case(good, tmp_path):
    """A private copy of the good database: (its path, its URL)."""
    path = tmp_path / "case.db"
    path.write_bytes(good.read_bytes())
    return path, f"sqlite:///{path}"


def _foreign(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (x TEXT)")
    conn.commit()
    conn.close()


def _old_schema(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("UPDATE dooly_meta SET value = '0' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()


def _write(tmp: Path, name: str, text: str) -> str:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


CSV_HEAD = "arrival_time,prompt_tokens,output_tokens\n"
# (id, csv body, words the error names)
CSV_ROWS = [
    ("nan-arrival", "0,10,5\nnan,10,5\n", ("row 2", "nan", "not finite")),
    ("inf-arrival", "0,10,5\ninf,10,5\n", ("row 2", "inf", "not finite")),
    ("negative-first-arrival", "-1,10,5\n2,10,5\n", ("row 1", ">= 0", "-1")),
    ("fractional-tokens", "0,10.5,5\n", ("row 1", "10.5", "whole number")),
    ("missing-field", "0,10,5\n1,10\n", ("row 2", "output tokens is missing")),
]


@pytest.mark.parametrize("name,body,needles", CSV_ROWS, ids=[r[0] for r in CSV_ROWS])
def test_workload_file_values(case, tmp_path, name, body, needles):
    path, url = case
    before = _sha(path)
    wl = _write(tmp_path, f"{name}.csv", CSV_HEAD + body)
    one_error(dooly("simulate", "dooly/tiny-llama", "--workload", wl, "--db", url, tmp=tmp_path), 2, wl, *needles)
    assert _sha(path) == before


SPEC_ROWS = [
    # user text that looks like Rich markup or emoji codes is printed as given
    ("emoji-codes", "n=4,prompt=uniform:100:10,output=8", ("'uniform:100:10'",)),
    ("emoji-letters", "n=4,prompt=uniform:A:B,output=8", ("'uniform:A:B'",)),
    ("misspelt-key", "n=4,promt=uniform:32:64,output=8", ("unknown workload key 'promt'", "prompt")),
    ("fractional-count", "n=2.5,prompt=8,output=8", ("2.5", "whole number")),
]


@pytest.mark.parametrize("name,spec,needles", SPEC_ROWS, ids=[r[0] for r in SPEC_ROWS])
def test_workload_specs(case, tmp_path, name, spec, needles):
    path, url = case
    before = _sha(path)
    one_error(dooly("simulate", "dooly/tiny-llama", "--workload", spec, "--db", url, tmp=tmp_path), 2, *needles)
    assert _sha(path) == before


@pytest.mark.parametrize("name", ["wl/[bold]x[/bold].csv", "wl/[/]a.csv"])
def test_markup_in_paths_is_text(case, tmp_path, name):
    path, url = case
    wl = str(tmp_path / name)
    one_error(dooly("simulate", "dooly/tiny-llama", "--workload", wl, "--db", url, tmp=tmp_path), 2,
              f"{wl}: no such workload file")


def test_kv_blocks_must_hold_one_request(case, tmp_path):
    path, url = case
    before = _sha(path)
    for blocks in ("0", "1"):
        one_error(dooly("simulate", "dooly/tiny-llama", "--workload", WL, "--db", url, "--num-gpu-blocks", blocks,
                        tmp=tmp_path), 2, "blocks")
        assert _sha(path) == before  # a failed simulation caches no fits either


def test_missing_data_is_not_an_slo_verdict(case, tmp_path):
    path, url = case
    before = _sha(path)
    common = ["--workload", WL, "--slo", "ttft_p99=10s", "--db", url, "--no-ray", "--grid", "max_num_seqs=8"]
    for cmd in (["search", "dooly/tiny-qwen2"], ["capacity", "dooly/tiny-qwen2", "--rate", "1"]):
        one_error(dooly(*cmd, *common, tmp=tmp_path), 2, "fill them with: dooly profile dooly/tiny-qwen2 --db")
    assert _sha(path) == before
    r = dooly("simulate", "dooly/tiny-llama", "--workload", WL, "--db", url, "--tensor-parallel-size", "2",
              tmp=tmp_path)
    one_error(r, 2, "tensor_parallel_size", "dooly profile dooly/tiny-llama --tp 2 --db")


def test_ranks_times_threads_checked_before_measuring(case, tmp_path):
    """More cores than this machine has (any machine: threads per rank = all of its cores)."""
    path, url = case
    before = _sha(path)
    cores = str(len(os.sched_getaffinity(0)))
    args = ["profile", "dooly/tiny-llama", "--grid", "reduced", "--tp", "2", "--threads", cores]
    one_error(dooly(*args, "--db", url, tmp=tmp_path), 2, "2 ranks", "need")
    assert _sha(path) == before
    fresh = tmp_path / "never.db"
    one_error(dooly(*args, "--db", f"sqlite:///{fresh}", tmp=tmp_path), 2, "need")
    assert not fresh.exists()


def test_refused_databases_are_left_untouched(tmp_path, good):
    foreign = tmp_path / "foreign.db"
    _foreign(foreign)
    old = tmp_path / "old.db"
    old.write_bytes(good.read_bytes())
    _old_schema(old)
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    text = tmp_path / "notes.db"
    text.write_text("not a database\n")
    rows = [
        (foreign, ["db", "stats"], "holds other tables"),
        (foreign, ["profile", "dooly/tiny-llama", "--grid", "reduced"], "holds other tables"),
        (old, ["db", "stats"], "schema version '0'"),
        (old, ["simulate", "dooly/tiny-llama", "--workload", WL], "schema version '0'"),
        (empty, ["db", "stats"], "empty file"),
        (empty, ["db", "ls"], "empty file"),
        (empty, ["db", "runs"], "empty file"),
        (empty, ["simulate", "dooly/tiny-llama", "--workload", WL], "empty file"),
        (text, ["db", "stats"], "not an SQLite database"),
    ]
    for path, cmd, needle in rows:
        wal = Path(f"{path}-wal")
        before, logged = _sha(path), wal.stat().st_size if wal.exists() else None
        one_error(dooly(*cmd, "--db", f"sqlite:///{path}", tmp=tmp_path), 2, needle)
        assert _sha(path) == before, (path.name, cmd)
        # not switched to write-ahead logging, nothing logged (a reader of a WAL file may leave an empty log)
        assert (wal.stat().st_size if wal.exists() else None) in (logged, 0 if logged is None else logged), cmd


def test_database_urls(tmp_path):
    for cmd in (["db", "stats"], ["simulate", "dooly/tiny-llama", "--workload", WL]):
        one_error(dooly(*cmd, "--db", "sqlite://", tmp=tmp_path), 2, "in-memory")
    one_error(dooly("db", "stats", "--db", "", tmp=tmp_path), 2, "empty database URL")
    line = one_error(dooly("db", "stats", "--db", "postgresql+psycopg://u:secretpw@127.0.0.1:1/x", tmp=tmp_path), 2,
                     "cannot open database", "u:***@127.0.0.1")
    assert "secretpw" not in line


def test_read_only_database_can_be_inspected(case, tmp_path):
    path, url = case
    before = _sha(path)
    path.chmod(0o444)
    try:
        r = dooly("db", "stats", "--db", url, tmp=tmp_path)
        assert r.rc == 0 and not r.lines, r.stderr
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            key = conn.execute("SELECT key FROM environments").fetchone()[0]
        assert key in r.stdout  # its environment, listed
        r = dooly("simulate", "dooly/tiny-llama", "--workload", WL, "--db", url, "--json", tmp=tmp_path)
        assert r.rc == 0, r.stderr
        assert {m["metric"] for m in json.loads(r.stdout)} >= {"ttft_s", "tpot_s"}
        one_error(dooly("profile", "dooly/tiny-llama", "--grid", "reduced", "--db", url, tmp=tmp_path), 2,
                  "read-only")
    finally:
        path.chmod(0o644)
    assert _sha(path) == before


def test_engine_refusals_carry_the_reason(case, tmp_path):
    path, url = case
    unknown = _write(tmp_path, "unknown/config.json", json.dumps({
        "architectures": ["FooForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "vocab_size": 100, "intermediate_size": 128}))
    remote = _write(tmp_path, "remote/config.json", json.dumps({
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"}, "hidden_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512,
        "vocab_size": 1000, "max_position_embeddings": 2048}))
    r = dooly("trace", unknown, "--format", "json", tmp=tmp_path)
    line = one_error(r, 2, "FooForCausalLM", "not supported")
    assert r.stdout == "" and len(line) < 400  # nothing half-written to stdout; not vLLM's list of every model
    one_error(dooly("trace", remote, tmp=tmp_path), 2, "trust_remote_code")
    before = _sha(path)
    one_error(dooly("simulate", "dooly/tiny-llama", "--workload", WL, "--db", url, "--no-enable-chunked-prefill",
                    "--max-num-batched-tokens", "64", tmp=tmp_path), 2, "max_num_batched_tokens (64)")
    assert _sha(path) == before


def test_tp_replicating_kv_heads_is_accepted(tmp_path):
    """vLLM replicates KV heads when there are fewer than ranks (Yi-6B: 4 KV heads at tp 8)."""
    r = dooly("trace", "01-ai/Yi-6B", "--tp", "8", "--format", "json", tmp=tmp_path)
    assert r.rc == 0, r.stderr[-2000:]
    t = json.loads(r.stdout)
    assert t["unresolved"] == 0
    attention = next(o for o in t["ops"] if o["op"] == "vllm::unified_attention_with_output")
    assert attention["dims"][1] == ["num_tokens", "1", "head_dim"]  # one KV head per rank
    one_error(dooly("trace", "01-ai/Yi-6B", "--tp", "3", tmp=tmp_path), 2, "num_attention_heads=32")


def test_usage_errors_are_one_line(tmp_path):
    one_error(dooly("simulate", "dooly/tiny-llama", "--bogus", tmp=tmp_path), 2, "--bogus", "dooly simulate --help")
    one_error(dooly("simulate", tmp=tmp_path), 2, "model")


def test_interrupt_then_resume(tmp_path):
    """Ctrl-C: one line, status 130, the run recorded as interrupted; the next run resumes, and the
    points the first one stored are counted as its work kept, not as reuse."""
    path = tmp_path / "resume.db"
    url = f"sqlite:///{path}"
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = dict(os.environ, TMPDIR=str(tmpdir), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([DOOLY, "profile", "dooly/tiny-llama", "--grid", "reduced", "--db", url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    stored = 0
    while time.time() < deadline and proc.poll() is None and stored < 5:
        time.sleep(0.5)
        if path.exists():
            try:
                with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
                    stored = conn.execute("SELECT count(*) FROM measurements").fetchone()[0]
            except sqlite3.Error:
                pass
    assert proc.poll() is None, "the profile ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    r = Run(proc.returncode, out, err, [x for x in err.splitlines() if x.strip()])
    one_error(r, 130, "interrupted")
    with sqlite3.connect(path) as conn:
        status, kept = conn.execute("SELECT status, (SELECT count(*) FROM measurements) FROM runs").fetchone()
    assert status == "interrupted" and kept >= 5
    r = dooly("profile", "dooly/tiny-llama", "--grid", "reduced", "--db", url, tmp=tmp_path)
    assert r.rc == 0, r.stderr[-2000:]
    assert "0 reused" in r.stdout and f"{kept} kept from an unfinished run" in r.stdout, r.stdout


def test_quantization_configs_refused_in_one_line(tmp_path):
    """A group size that does not divide a linear layer's input, and a scheme whose CPU weight set-up
    the tracer cannot run (AWQ 4-bit): one line each, before any database is opened."""
    from dooly.catalog import resolve

    base = dict(resolve("dooly/tiny-llama").config)
    awq = {"quant_method": "awq", "bits": 4, "version": "gemm", "zero_point": True}
    bad_group = _write(tmp_path, "group/config.json", json.dumps({**base, "quantization_config": {**awq,
                                                                                             "group_size": 96}}))
    refused = _write(tmp_path, "awq/config.json", json.dumps({**base, "quantization_config": {**awq,
                                                                                           "group_size": 128}}))
    db = tmp_path / "never.db"
    one_error(dooly("profile", bad_group, "--grid", "reduced", "--db", f"sqlite:///{db}", tmp=tmp_path), 2,
              "group_size 96 does not divide", "hidden_size = 512")
    one_error(dooly("profile", refused, "--grid", "reduced", "--db", f"sqlite:///{db}", tmp=tmp_path), 2,
              "quantized as awq cannot be traced here")
    assert not db.exists()


def test_quantization_flags_refused_in_one_line(case, tmp_path):
    """An unknown --quantization, a checkpoint method on an unquantized model, and an online method
    this CPU build has no kernel for (FP8): one line each, naming the method, the database untouched."""
    path, url = case
    before = _sha(path)
    one_error(dooly("profile", "dooly/tiny-llama", "--quantization", "int3", "--db", url, tmp=tmp_path), 2,
              "unknown --quantization 'int3'", "compressed-tensors")
    one_error(dooly("simulate", "dooly/tiny-llama", "--quantization", "gptq", "--workload", WL, "--db", url,
                    tmp=tmp_path), 2, "--quantization gptq reads a checkpoint quantized that way", "fp8")
    one_error(dooly("profile", "dooly/tiny-llama", "--quantization", "fp8", "--grid", "reduced", "--db", url,
                    tmp=tmp_path), 2, "quantized as fp8 cannot be traced here", "no CPU kernel for")
    one_error(dooly("search", "dooly/tiny-llama", "--grid", "quantization=auto,int3", "--workload", WL,
                    "--slo", "ttft_p99=10s", "--db", url, "--no-ray", tmp=tmp_path), 2, "quantization=int3")
    assert _sha(path) == before
