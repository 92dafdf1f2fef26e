"""Workload generators and parsers: good files, bad files, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dooly.errors import DoolyError
from dooly.workload import load, synthetic


def test_synthetic_is_seeded_and_shaped():
    a = synthetic(200, prompt="uniform:50:1000", output="normal:128:32", arrivals="poisson:4", seed=7)
    b = synthetic(200, prompt="uniform:50:1000", output="normal:128:32", arrivals="poisson:4", seed=7)
    assert a == b and a != synthetic(200, prompt="uniform:50:1000", arrivals="poisson:4", seed=8)
    assert all(50 <= r.prompt_tokens <= 1000 and r.output_tokens >= 1 for r in a)
    t = np.array([r.arrival_s for r in a])
    assert t[0] == 0 and (np.diff(t) >= 0).all()
    assert 3 < len(t) / t[-1] < 5  # ~4 requests per second
    gaps = np.diff([r.arrival_s for r in synthetic(2000, arrivals="gamma:4:3", seed=1)])
    assert gaps.std() / gaps.mean() > 2  # bursty: CV ~3
    assert {r.arrival_s for r in synthetic(5)} == {0.0}


@pytest.mark.parametrize("kw, message", [
    ({"prompt": "uniform:5"}, "bad prompt length"),
    ({"output": "0"}, "output lengths must be >= 1"),
    ({"arrivals": "poisson:-1"}, "bad arrivals"),
    ({"arrivals": "weibull:3"}, "bad arrivals"),
])
def test_synthetic_bad_specs(kw, message):
    with pytest.raises(DoolyError, match=message):
        synthetic(10, **kw)


def test_csv_traces_in_three_dialects(tmp_path):
    (tmp_path / "own.csv").write_text("arrival_s,prompt_tokens,output_tokens\n0.5,100,20\n0.7,300,5\n")
    (tmp_path / "vidur.csv").write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,100,20\n0.2,300,5\n")
    (tmp_path / "azure.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                        "2023-11-16 18:15:46.6805900,100,20\n2023-11-16 18:15:46.8805900,300,5\n")
    for name in ("own.csv", "vidur.csv", "azure.csv"):
        reqs = load(tmp_path / name)
        assert [(r.prompt_tokens, r.output_tokens) for r in reqs] == [(100, 20), (300, 5)]
        assert reqs[0].arrival_s == 0 and reqs[1].arrival_s == pytest.approx(0.2)


def test_bench_serve_and_sharegpt(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps(
        {"input_lens": [50, 60], "output_lens": [7, 8], "start_times": [10.5, 10.0], "ttfts": [0.1, 0.2]}))
    reqs = load(tmp_path / "bench.json")
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in reqs] == [(0.0, 60, 8), (0.5, 50, 7)]
    (tmp_path / "sg.json").write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "one two three"}, {"from": "gpt", "value": "four five"}]}]))
    assert [(r.prompt_tokens, r.output_tokens) for r in load(tmp_path / "sg.json")] == [(3, 2)]


@pytest.mark.parametrize("content, message", [
    ("arrival_s,prompt_tokens\n0,1\n", "missing column for output"),
    ("arrival_s,prompt_tokens,output_tokens\n0,100,20\n1,-5,3\n", "row 2: prompt tokens must be >= 1"),
    ("arrival_s,prompt_tokens,output_tokens\n0,100,20\n1,abc,3\n", "row 2: prompt tokens 'abc' is not a number"),
    ("arrival_s,prompt_tokens,output_tokens\n2,100,20\n1,10,3\n", "row 2: arrival time 1.0 is earlier"),
    ("arrival_s,prompt_tokens,output_tokens\n0,5000,20\n", "row 1: prompt_tokens 5000 \\+ output_tokens 20 exceed"),
])
def test_bad_csv_rows_name_file_row_and_field(tmp_path, content, message):
    f = tmp_path / "bad.csv"
    f.write_text(content)
    with pytest.raises(DoolyError, match=message) as e:
        load(f, max_len=4096)
    assert str(f) in str(e.value)


def test_unrecognised_files(tmp_path):
    (tmp_path / "x.json").write_text('{"foo": 1}')
    (tmp_path / "y.json").write_text("{oops")
    with pytest.raises(DoolyError, match="not a CSV trace"):
        load(tmp_path / "x.json")
    with pytest.raises(DoolyError, match="malformed JSON"):
        load(tmp_path / "y.json")
    with pytest.raises(DoolyError, match="no such workload file"):
        load(tmp_path / "none.csv")
