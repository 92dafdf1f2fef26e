"""The CLI's own plumbing: commands the quickstart calls directly get every option's real default."""

from __future__ import annotations

import inspect

import pytest


def test_quickstart_calls_each_stage_with_every_option_filled(monkeypatch):
    """A typer command called as a function receives an option's OptionInfo as its value when the
    caller leaves it out (the quickstart once passed one as --kv-cache-dtype); the quickstart's calls
    must give every parameter a real value."""
    from typer.models import ParameterInfo

    import dooly.api
    import dooly.cli as cli

    called = []

    def invoke(command, **given):
        kw = cli._filled(command, **given)
        assert set(kw) == set(inspect.signature(command).parameters)
        bad = sorted(k for k, v in kw.items() if isinstance(v, ParameterInfo))
        assert not bad, f"{command.__name__}: {bad} left as typer OptionInfo"
        called.append((command.__name__, kw))

    monkeypatch.setattr(cli, "_invoke", invoke)
    monkeypatch.setattr(dooly.api, "calibrated", lambda db: False)
    cli.quickstart(model="dooly/tiny-llama", sibling="dooly/tiny-llama-deep", workload="n=2,prompt=8,output=2",
                   db="sqlite:///unused.db", out="unused")
    assert [name for name, _ in called] == ["trace", "profile", "profile", "calibrate", "simulate"]
    trace_kw = called[0][1]
    assert trace_kw["kv_cache_dtype"] == "auto" and trace_kw["quantization"] is None
    assert called[1][1]["grid"] == "reduced" and called[1][1]["db"] == "sqlite:///unused.db"


def test_filled_refuses_a_missing_required_argument():
    import dooly.cli as cli

    with pytest.raises(TypeError, match="model is required"):
        cli._filled(cli.simulate, workload="n=1,prompt=8,output=1")
