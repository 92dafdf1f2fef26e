"""Serving metrics from simulated (or measured) requests, as pandas tables."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dooly.records import RequestResult, StepResult

PERCENTILES = (50, 90, 99)


def requests_frame(results: list[RequestResult]) -> pd.DataFrame:
    rows = []
    for r in results:
        itl = np.diff(r.token_times) if len(r.token_times) > 1 else np.array([])
        rows.append({"request_id": r.request_id, "arrival_s": r.arrival_s, "prompt_tokens": r.prompt_tokens,
                     "output_tokens": r.output_tokens, "ttft_s": r.ttft_s, "tpot_s": r.tpot_s, "e2e_s": r.e2e_s,
                     "finish_s": r.token_times[-1], "itl_mean_s": float(itl.mean()) if itl.size else None})
    return pd.DataFrame(rows)


def steps_frame(steps: list[StepResult]) -> pd.DataFrame:
    return pd.DataFrame([{
        "start_s": s.start_s, "end_s": s.end_s, "latency_s": s.end_s - s.start_s,
        "num_reqs": len(s.req_ids), "num_tokens": s.batch.num_tokens,
        "prefill_tokens": sum(q for q in s.batch.query_lens if q > 1),
        "decode_reqs": sum(1 for q in s.batch.query_lens if q == 1),
        "preempted": len(s.preempted),
        # the exact composition, in batch order (space-separated: CSV-friendly)
        "req_ids": " ".join(map(str, s.req_ids)),
        "context_lens": " ".join(map(str, s.batch.context_lens)),
        "query_lens": " ".join(map(str, s.batch.query_lens))} for s in steps])


def summary(results: list[RequestResult]) -> pd.DataFrame:
    """One row per metric (ttft, tpot, itl, e2e; seconds): mean and percentiles; plus throughput rows."""
    itls = np.concatenate([np.diff(r.token_times) for r in results if len(r.token_times) > 1] or [np.array([])])
    series = {
        "ttft_s": np.array([r.ttft_s for r in results]),
        "tpot_s": np.array([r.tpot_s for r in results if r.tpot_s is not None]),
        "itl_s": itls,
        "e2e_s": np.array([r.e2e_s for r in results]),
    }
    rows = []
    for name, v in series.items():
        row = {"metric": name, "mean": float(v.mean()) if v.size else float("nan")}
        for p in PERCENTILES:
            row[f"p{p}"] = float(np.percentile(v, p)) if v.size else float("nan")
        rows.append(row)
    span = max(r.token_times[-1] for r in results) - min(r.arrival_s for r in results)
    tokens = sum(len(r.token_times) for r in results)
    rows.append({"metric": "requests_per_s", "mean": len(results) / span if span > 0 else float("nan")})
    rows.append({"metric": "output_tokens_per_s", "mean": tokens / span if span > 0 else float("nan")})
    return pd.DataFrame(rows)
