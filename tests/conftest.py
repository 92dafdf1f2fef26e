"""Shared, expensive fixtures: traces and one real engine per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_llama():
    from dooly.catalog import resolve

    return resolve("dooly/tiny-llama")


@pytest.fixture(scope="session")
def tiny_llama_trace(tiny_llama):
    from dooly.trace import trace_model

    return trace_model(tiny_llama, engine="vllm")


@pytest.fixture(scope="session")
def tiny_llama_engine(tiny_llama):
    """A real in-process vLLM engine (V1, CPU, eager, dummy weights) on the tiny Llama."""
    from dooly.engines.vllm.engine import start_engine

    llm = start_engine(tiny_llama.config)
    yield llm
    del llm
