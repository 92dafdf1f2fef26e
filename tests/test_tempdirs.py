"""No dooly-* folder outlives the process that made it (each run below gets a fresh TMPDIR).

The one-process world of a trace keeps its store in memory (a file store's folder outlived every Ray
worker that traced or profiled attention: they exit without running exit handlers); an engine's
model folder goes when the engine stops, or at exit for an engine never stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys

# a Ray worker (or a TP rank) ends without running exit handlers
TRACE_THEN_EXIT = """
import os
from dooly.catalog import resolve
from dooly.engines.vllm.tracer import run_trace

run_trace(resolve("dooly/tiny-llama").config)
os._exit(0)
"""

ENGINE = """
import glob, os, tempfile
from dooly.catalog import resolve
from dooly.engines.vllm.engine import running_engine, start_engine

config = resolve("dooly/tiny-llama").config
ours = os.path.join(tempfile.gettempdir(), "dooly-*")
with running_engine(config):
    assert glob.glob(ours), "the model folder is there while the engine runs"
assert not glob.glob(ours), glob.glob(ours)
start_engine(config)  # never stopped: its folder goes at exit
"""


def _run(tmp_path, args: list[str]) -> subprocess.CompletedProcess:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "DOOLY_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in tmp.glob("dooly-*")) == []
    return r


def test_trace_leaves_no_folder(tmp_path):
    r = _run(tmp_path, ["-m", "dooly.cli", "trace", "dooly/tiny-llama"])
    assert "traced in" in r.stdout  # traced here (a fresh cache), not read back


def test_trace_in_a_process_without_exit_handlers_leaves_no_folder(tmp_path):
    _run(tmp_path, ["-c", TRACE_THEN_EXIT])


def test_engine_leaves_no_folder(tmp_path):
    _run(tmp_path, ["-c", ENGINE])
