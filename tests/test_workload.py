"""Workload generators and parsers: good files, bad files, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dooly.errors import DoolyError
from dooly.workload import load, parse_workload, synthetic


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


HEADER = "arrival_s,prompt_tokens,output_tokens\n"


@pytest.mark.parametrize("rows, message", [
    ("0,10,5\nnan,10,5\n", "row 2: arrival time 'nan' is not finite"),
    ("0,10,5\ninf,10,5\n", "row 2: arrival time 'inf' is not finite"),
    ("-1,10,5\n0,10,5\n", "row 1: arrival time must be >= 0, got -1.0"),
    ("0,10.5,5\n", "row 1: prompt tokens '10.5' is not a whole number"),
    ("0,10,5\n1,10,0.5\n", "row 2: output tokens '0.5' is not a whole number"),
    ("0,10,5\n1,nan,5\n", "row 2: prompt tokens 'nan' is not a whole number"),
    ("0,10,5\n1,10\n", "row 2: output tokens is missing"),  # a short row: csv gives None
    ("0,,5\n", "row 1: prompt tokens is missing"),
    (",10,5\n", "row 1: arrival time is missing"),
    ("0,10,0\n", "row 1: output tokens must be >= 1, got 0"),
])
def test_bad_csv_values_are_refused_in_one_line(tmp_path, rows, message):
    f = tmp_path / "bad.csv"
    f.write_text(HEADER + rows)
    with pytest.raises(DoolyError, match=message) as e:
        load(f)
    assert str(e.value).startswith(f"{f}: ") and "\n" not in str(e.value)


def test_csv_whole_floats_and_byte_order_mark_pass(tmp_path):
    f = tmp_path / "ok.csv"
    f.write_text("\ufeff" + HEADER + "0.0,10.0,5\n1,20,6.0\n")
    assert [(r.prompt_tokens, r.output_tokens) for r in load(f)] == [(10, 5), (20, 6)]
    f.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DoolyError, match="not a UTF-8 text file"):
        load(f)


@pytest.mark.parametrize("data, message", [
    ({"input_lens": [10, 10.5], "output_lens": [5, 5]}, "row 2: input_lens 10.5 is not a whole number"),
    ({"input_lens": [10], "output_lens": [None]}, "row 1: output_lens is missing"),
    ({"input_lens": [10], "output_lens": ["x"]}, "row 1: output_lens 'x' is not a number"),
    ({"input_lens": [10], "output_lens": [5], "start_times": [float("nan")]}, "row 1: arrival time nan is not finite"),
    ({"input_lens": [10], "output_lens": [5], "start_times": [-2.0]}, "row 1: arrival time must be >= 0, got -2.0"),
    ({"input_lens": [10, 11], "output_lens": [5, 5], "start_times": [0.0]}, "start_times do not match input_lens"),
    ({"input_lens": 3, "output_lens": [5]}, "input_lens is not a list"),
    # rows keep the file's numbering after sorting by start time
    ({"input_lens": [5000, 10], "output_lens": [5, 5], "start_times": [2.0, 1.0]}, "row 1: prompt_tokens 5000"),
])
def test_bad_bench_serve_values(tmp_path, data, message):
    f = tmp_path / "bench.json"
    f.write_text(json.dumps(data))
    with pytest.raises(DoolyError, match=message) as e:
        load(f, max_len=4096)
    assert str(e.value).startswith(f"{f}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("data, message", [
    ([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, 5],
     "row 2: not a conversation"),
    ([{"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}]}], "row 1: .* not text"),
    ([{"conversations": [{"from": "human", "value": "a"}]}], "row 1: conversation lacks"),
])
def test_bad_sharegpt_entries(tmp_path, data, message):
    f = tmp_path / "sg.json"
    f.write_text(json.dumps(data))
    with pytest.raises(DoolyError, match=message) as e:
        load(f)
    assert str(e.value).startswith(f"{f}: ") and "\n" not in str(e.value)


GOOD = "n=4,prompt=uniform:32:64,output=uniform:4:8,arrivals=poisson:4,seed=0"


@pytest.mark.parametrize("spec, message", [
    ("n=4,promt=uniform:32:64,output=8", "unknown workload key 'promt' in .*: keys are n, prompt, output, arrivals"),
    ("n=4,promt=" + "x" * 300, "unknown workload key 'promt'"),  # longer than a file name may be
    ("n=4,uniform:32:64", "'uniform:32:64' is not KEY=VALUE"),
    ("n=4,n=5", "key 'n' given twice"),
    ("n=2.5,prompt=8", "n '2.5' is not a whole number"),
    ("n=0,prompt=8", "n must be >= 1, got 0"),
    ("n=4,seed=-1", "seed must be >= 0, got -1"),
    ("n=4,seed=x", "seed 'x' is not a whole number"),
    ("n=4,prompt=10.5", "bad prompt length '10.5'"),
    ("n=4,prompt=uniform:1.5:8", "bad prompt length 'uniform:1.5:8'"),
    ("n=4,output=uniform:4", "bad output length 'uniform:4'"),
    ("n=4,output=uniform:8:4", "bad output length 'uniform:8:4'"),
    ("n=4,output=normal:nan:4", "bad output length 'normal:nan:4'"),
    ("n=4,output=normal:8:-1", "bad output length 'normal:8:-1'"),
    ("n=4,output=0", "output lengths must be >= 1"),
    ("n=4,arrivals=poisson:0", "bad arrivals 'poisson:0'"),
    ("n=4,arrivals=poisson:inf", "bad arrivals 'poisson:inf'"),
    ("n=4,arrivals=poisson:nan", "bad arrivals 'poisson:nan'"),
    ("n=4,arrivals=poisson", "bad arrivals 'poisson'"),
    ("n=4,arrivals=gamma:4:0", "bad arrivals 'gamma:4:0'"),
    ("n=4,arrivals=gamma:4:-1", "bad arrivals 'gamma:4:-1'"),
    ("n=4,arrivals=gamma:inf:1", "bad arrivals 'gamma:inf:1'"),
    ("n=4,arrivals=burst:3", "bad arrivals 'burst:3'"),
])
def test_bad_synthetic_specs_name_key_and_value(spec, message):
    with pytest.raises(DoolyError, match=message) as e:
        parse_workload(spec)
    assert repr(spec) in str(e.value) and "\n" not in str(e.value)


def test_good_synthetic_spec_parses():
    reqs = parse_workload(GOOD)
    assert len(reqs) == 4 and reqs == parse_workload(GOOD.replace(",", ", "))
    assert all(32 <= r.prompt_tokens <= 64 and 4 <= r.output_tokens <= 8 for r in reqs)
