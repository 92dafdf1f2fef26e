"""`dooly validate`: serve a workload on the real engine and simulate it, then compare.

Ground truth: the in-process vLLM engine (`dooly.engines.vllm.engine.serve`), arrival times
honoured on the wall clock, fixed output lengths, random weights, the engine's own thread set-up.
Hygiene: one warm-up workload per engine start (excluded), the prefix cache reset before every run
(each run starts as cold as the simulator does), `repeats` runs whose spread is reported next to
every figure, so a model error can be told from machine noise.

Comparison, per workload:
- metrics: TTFT / TPOT / ITL / E2E mean, p50, p90, p99 — measured (median over runs), run-to-run
  spread ((max - min) / median), predicted, absolute percentage error;
- per-request MAPE of TTFT, TPOT and E2E (request i simulated vs request i measured, mean over runs);
- steps: each measured step's latency vs the prediction for *the batch the engine really ran*
  (so scheduling differences do not hide in it), by step type (prefill / decode / mixed), with the
  predicted split into stateless ops, attention and overhead — where the error lives;
- batch composition: the share of steps, index by index, where the simulator scheduled exactly the
  requests and token counts the engine did;
- drift: before the first engine run and after each, a few sentinel points of the database are
  re-timed (`dooly.profile.sentinels`): the machine's time ratio now / when profiled. The errors are
  given raw and speed-corrected (the simulation's steps scaled by the median ratio), next to the
  noise floor (the engine's run-to-run spread); a metric whose noise floor exceeds the 5% target is
  inconclusive, not evidence either way.
- op split (`op_split=True`): one more run with every op timed inside the engine; per step type and
  op family (gemm, attention, kv_write, elementwise, collective), the in-engine time against its
  prediction for the same batches, and the rest of the step against the predicted overhead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dooly.deployment import Deployment
from dooly.engine_interface import get_engine
from dooly.errors import DoolyError
from dooly.records import FREE, IN_PROCESS_OPTIONS, EngineOptions
from dooly.sim.metrics import requests_frame, steps_frame, summary
from dooly.workload import ENGINE_WARMUP, parse_workload

LATENCY_METRICS = ("ttft_s", "tpot_s", "itl_s", "e2e_s")
TARGET = 0.05  # the accuracy target: a noise floor above it makes a comparison inconclusive
STATS = ("mean", "p50", "p90", "p99")


@dataclass
class WorkloadValidation:
    workload: str
    metrics: pd.DataFrame  # metric, stat, measured, spread, predicted, ape
    per_request: dict  # ttft / tpot / e2e -> MAPE (fraction)
    steps: pd.DataFrame  # measured steps of every run: run, type, measured_s, predicted_s, by kind
    step_types: pd.DataFrame  # per step type: steps, MAPE, mean signed error, predicted split
    match_rate: float  # share of steps with the same composition in the simulator and the engine
    measured: list = field(default_factory=list)  # per run: (requests frame, steps frame)
    predicted: object = None  # dooly.sim.run.SimulationResult
    # drift: the machine's time ratio (now / when the database was measured) before the first engine
    # run and after each (`dooly.profile.sentinels`), and the per-request MAPE of a simulation whose
    # steps are scaled by their median ("speed-corrected")
    time_ratios: list = field(default_factory=list)
    per_request_corrected: dict = field(default_factory=dict)
    # where the error sits (`op_split`): per step type and op family, the ops' time inside the engine
    # (one extra run with every op timed) against their prediction for the same batches, and the
    # rest of a step (measured step - its ops in the engine) against the predicted overhead
    op_split: pd.DataFrame = field(default_factory=pd.DataFrame)
    num_blocks: int = 0  # KV-cache blocks of each rank, as the running engine reports them (the simulator's too)

    def headline(self, target: float = TARGET) -> dict:
        """The errors, raw and speed-corrected, with the noise floor (the engine's run-to-run spread
        of the mean): a metric whose noise floor exceeds `target` is inconclusive at that target."""
        m = self.metrics.set_index(["metric", "stat"])
        ratios = [r for r in self.time_ratios if r == r]
        floor = {k: float(m.loc[(f"{k}_s", "mean"), "spread"]) for k in ("ttft", "tpot")}
        return {
            "ttft_mape": self.per_request["ttft"], "tpot_mape": self.per_request["tpot"],
            "p99_ttft_err": float(m.loc[("ttft_s", "p99"), "ape"]),
            "step_mape": float(np.mean(np.abs(self.steps["err"]))) if len(self.steps) else float("nan"),
            "match_rate": self.match_rate,
            "spread_ttft": floor["ttft"], "spread_tpot": floor["tpot"],
            "time_ratio": float(np.median(ratios)) if ratios else float("nan"),
            "time_ratio_min": min(ratios, default=float("nan")), "time_ratio_max": max(ratios, default=float("nan")),
            "ttft_mape_corrected": self.per_request_corrected.get("ttft", float("nan")),
            "tpot_mape_corrected": self.per_request_corrected.get("tpot", float("nan")),
            "inconclusive_ttft": not floor["ttft"] <= target, "inconclusive_tpot": not floor["tpot"] <= target,
        }


def step_type(query_lens) -> str:
    pre = any(q > 1 for q in query_lens)
    dec = any(q == 1 for q in query_lens)
    return "mixed" if pre and dec else ("prefill" if pre else "decode")


def _ape(pred: float, meas: float) -> float:
    return abs(pred - meas) / meas if meas and meas == meas else float("nan")


def _per_request(runs: list, predicted) -> dict:
    """ttft / tpot / e2e -> per-request MAPE of `predicted` (a SimulationResult), averaged over runs."""
    pred_req = predicted.requests.set_index("request_id")
    per_request = {}
    for name in ("ttft", "tpot", "e2e"):
        errs = []
        for reqs, _ in runs:
            meas = requests_frame(reqs).set_index("request_id")[f"{name}_s"]
            p = pred_req[f"{name}_s"].reindex(meas.index)
            ok = meas.notna() & p.notna() & (meas > 0)
            errs.append(float((np.abs(p[ok] - meas[ok]) / meas[ok]).mean()) if ok.any() else float("nan"))
        per_request[name] = float(np.nanmean(errs)) if not all(e != e for e in errs) else float("nan")
    return per_request


def compare(workload: str, runs: list, predicted, step_predictor, corrected=None,
            time_ratios: list | None = None) -> WorkloadValidation:
    """`runs`: per measured run (RequestResult list, StepResult list); `predicted`: SimulationResult;
    `corrected`: the simulation with steps scaled by the machine's measured time ratio (`time_ratios`)."""
    summaries = [summary(reqs).set_index("metric") for reqs, _ in runs]
    psum = predicted.summary.set_index("metric")
    rows = []
    for metric in LATENCY_METRICS:
        for stat in STATS:
            vals = np.array([s.loc[metric, stat] for s in summaries], float)
            med = float(np.median(vals))
            spread = float((vals.max() - vals.min()) / med) if med else float("nan")
            p = float(psum.loc[metric, stat])
            rows.append({"metric": metric, "stat": stat, "measured": med, "spread": spread, "predicted": p,
                         "ape": _ape(p, med)})
    metrics = pd.DataFrame(rows)

    per_request = _per_request(runs, predicted)
    step_rows, matches = [], []
    pred_steps = predicted.steps
    for k, (_, steps) in enumerate(runs):
        for s in steps:
            p = step_predictor(s.batch)
            meas = s.end_s - s.start_s
            step_rows.append({"run": k, "type": step_type(s.batch.query_lens), "num_reqs": len(s.req_ids),
                              "num_tokens": s.batch.num_tokens, "measured_s": meas, "predicted_s": p.us / 1e6,
                              "err": (p.us / 1e6 - meas) / meas,
                              **{f"pred_{kind}_s": us / 1e6 for kind, us in p.by_kind.items()}})
        mf = steps_frame(steps)
        n = max(len(mf), len(pred_steps))
        cols = ["req_ids", "context_lens", "query_lens"]
        same = sum(1 for i in range(min(len(mf), len(pred_steps)))
                   if all(mf.iloc[i][c] == pred_steps.iloc[i][c] for c in cols))
        matches.append(same / n if n else 1.0)
    st = pd.DataFrame(step_rows)
    types = []
    if len(st):
        for t, g in st.groupby("type"):
            row = {"type": t, "steps": len(g), "mape": float(g["err"].abs().mean()),
                   "mean_signed_err": float(g["err"].mean()), "measured_ms": 1e3 * float(g["measured_s"].mean()),
                   "predicted_ms": 1e3 * float(g["predicted_s"].mean())}
            for c in g.columns:
                if c.startswith("pred_") and c != "predicted_s":
                    row[c.removeprefix("pred_").removesuffix("_s") + "_ms"] = 1e3 * float(g[c].mean())
            types.append(row)
    return WorkloadValidation(workload, metrics, per_request, st, pd.DataFrame(types), float(np.mean(matches)),
                              [(requests_frame(r), steps_frame(s)) for r, s in runs], predicted,
                              list(time_ratios or []), _per_request(runs, corrected) if corrected is not None else {})


def op_split(timed_steps: list, timed_ops: list, measured: pd.DataFrame, step_predictor, engine) -> pd.DataFrame:
    """Per step type and op family: mean in-engine ms per step (`timed_steps` with their `timed_ops`)
    vs predicted ms for the same batches; the row "rest" is the mean measured step (`measured`, the
    untimed runs) minus the mean in-engine ops, against the predicted overhead."""
    from dooly.predict.in_engine import family_times

    rows = []
    for s, in_engine in zip(timed_steps, family_times(engine, timed_steps, timed_ops)):
        kind = step_type(s.batch.query_lens)
        p = step_predictor(s.batch)
        for family in sorted((set(in_engine) | set(p.by_family)) - {FREE}):
            rows.append({"type": kind, "family": family, "in_engine_ms": in_engine.get(family, 0.0) / 1e3,
                         "predicted_ms": p.by_family.get(family, 0.0) / 1e3})
        rows.append({"type": kind, "family": "ops", "in_engine_ms": sum(v for f, v in in_engine.items() if f != FREE) / 1e3,
                     "predicted_ms": sum(p.by_family.values()) / 1e3})
        rows.append({"type": kind, "family": "overhead", "in_engine_ms": float("nan"),
                     "predicted_ms": p.by_kind.get("overhead", 0.0) / 1e3})
    if not rows:
        return pd.DataFrame()
    per_step = pd.DataFrame(rows)
    out = per_step.groupby(["type", "family"], sort=False).agg(
        steps=("predicted_ms", "size"), in_engine_ms=("in_engine_ms", "mean"), predicted_ms=("predicted_ms", "mean"),
    ).reset_index()
    for t in out["type"].unique():  # the rest of a measured step, outside its ops
        ops = out[(out["type"] == t) & (out["family"] == "ops")]["in_engine_ms"].iloc[0]
        meas = measured[measured["type"] == t]["measured_s"]
        rest = 1e3 * float(meas.mean()) - ops if len(meas) else float("nan")
        out.loc[(out["type"] == t) & (out["family"] == "overhead"), "in_engine_ms"] = rest
    out["signed_err"] = (out["predicted_ms"] - out["in_engine_ms"]) / out["in_engine_ms"]
    return out


def validate(model: str, workloads: list[str], *, db: str | None = None, dtype: str = "bfloat16", repeats: int = 3,
             tensor_parallel_size: int = 1, options: EngineOptions = IN_PROCESS_OPTIONS, threads: int | None = None,
             progress=None, llm=None, split_ops: bool = False, **engine_options) -> list[WorkloadValidation]:
    """Serve each workload `repeats` times on the real engine and simulate it; compare (see module doc).

    Engine options as for `simulate` (`options`, and any of its fields by name on top). `llm`: an
    already started engine of this model (`running_engine`) to reuse; the simulator then takes the
    engine's effective limits and KV blocks from it, whatever the options say. `split_ops`: one more
    run per workload with every op timed in the engine (`op_split`; TP=1 only)."""
    from dooly.predict import StepPredictor
    from dooly.sim.run import model_context

    if repeats < 1:
        raise DoolyError(f"repeats must be >= 1, got {repeats}")
    if split_ops and tensor_parallel_size > 1:
        raise DoolyError("the op split times ops in the engine's own process: TP=1 only")
    deployment = Deployment.resolve(model, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                                    options=options.replace(**engine_options), threads=threads)
    context = model_context(deployment, db)
    step = StepPredictor(*context)  # fails now if data is missing
    parsed = [parse_workload(w, deployment.max_model_len) for w in workloads]  # bad workloads fail before the engine
    say = progress or (lambda msg: None)
    if llm is None:
        d = deployment
        say(f"starting the engine for {d.model}")
        with get_engine(d.engine).running_engine(d.spec.config, dtype=d.dtype, kv_cache_gib=d.options.kv_cache_gib,
                                                 tensor_parallel_size=d.tensor_parallel_size, threads=d.threads,
                                                 **d.engine_kwargs()) as own:
            return _validate_on(own, deployment, context, workloads, parsed, step, db, repeats, say, split_ops)
    return _validate_on(llm, deployment, context, workloads, parsed, step, db, repeats, say, split_ops)


def _validate_on(llm, deployment, context, workloads, parsed, step, db, repeats, say, split_ops=False):
    """Serve and simulate every workload on a started engine (its effective limits are the simulator's)."""
    from dooly.profile.sentinels import pick_sentinels, time_ratio
    from dooly.sim.run import simulate_deployment

    engine = get_engine(deployment.engine)
    actual = engine.engine_settings(llm)
    blocks = actual.pop("num_gpu_blocks")
    d = Deployment.resolve(deployment.spec, dtype=deployment.dtype, tensor_parallel_size=deployment.tensor_parallel_size,
                           options=deployment.options.replace(**actual), threads=deployment.threads, num_blocks=blocks)
    vocab = d.spec.config["vocab_size"]
    trace, predictor = context
    sentinels = pick_sentinels(trace, predictor.db.points(d.env.key))
    llm.reset_prefix_cache()
    engine.serve(llm, parse_workload(f"{ENGINE_WARMUP},seed=123"), vocab)
    out = []
    for text, requests in zip(workloads, parsed):
        runs, ratios = [], [time_ratio(sentinels, d.engine, d.threads)]  # the machine's speed around every run
        for k in range(repeats):
            llm.reset_prefix_cache()
            say(f"{d.model}: {text}: engine run {k + 1}/{repeats} (machine time ratio {ratios[-1]:.2f})")
            runs.append(engine.serve(llm, requests, vocab))
            ratios.append(time_ratio(sentinels, d.engine, d.threads))
        say(f"{d.model}: {text}: simulating")
        predicted = simulate_deployment(d, requests, db=db, context=context)
        known = [r for r in ratios if r == r]
        corrected = simulate_deployment(d, requests, db=db, context=context,
                                        time_scale=float(np.median(known))) if known else None
        v = compare(text, runs, predicted, step, corrected, ratios)
        v.num_blocks = blocks
        if split_ops:
            llm.reset_prefix_cache()
            say(f"{d.model}: {text}: one more run with its ops timed")
            with engine.time_ops(llm) as timed:
                steps = engine.serve(llm, requests, vocab)[1]
            v.op_split = op_split(steps, timed, v.steps, step, engine)
        out.append(v)
    return out


def write_validation(results: list[WorkloadValidation], out) -> None:
    """Every workload's measured and predicted data, headline and plot into `out`/workload<i>/."""
    from dooly.validate.plots import write_plot

    root = Path(out)
    for i, v in enumerate(results):
        folder = root / f"workload{i}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "workload.txt").write_text(v.workload + "\n")
        v.metrics.to_csv(folder / "metrics.csv", index=False)
        v.steps.to_csv(folder / "steps_measured_vs_predicted.csv", index=False)
        v.step_types.to_csv(folder / "step_types.csv", index=False)
        if len(v.op_split):
            v.op_split.to_csv(folder / "op_split.csv", index=False)
        for k, (reqs, steps) in enumerate(v.measured):
            reqs.to_csv(folder / f"requests_measured_run{k}.csv", index=False)
            steps.to_csv(folder / f"steps_measured_run{k}.csv", index=False)
        v.predicted.requests.to_csv(folder / "requests_predicted.csv", index=False)
        v.predicted.steps.to_csv(folder / "steps_predicted.csv", index=False)
        (folder / "headline.json").write_text(json.dumps(v.headline(), indent=1) + "\n")
        write_plot(v, folder / "predicted_vs_measured.png")
