"""Selective, incremental profiling: measure only the (signature, point) pairs the database lacks.

    traces ──> plan_profile ──> ProfilePlan ──> run_profile ──> ProfileSummary
                  (db lookup)                    (measure, store each point at once)

Stateless ops are replayed here, stateful ones through the engine's own set-up (its `stateful`
module), collectives between real ranks of a tensor-parallel group (its `collectives` module,
one group started per run, measured last).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from dooly.db import Environment, LatencyDB, Measurement, parse_point, point_key
from dooly.engine_interface import get_engine
from dooly.errors import DoolyError
from dooly.profile.grid import Limits, points
from dooly.profile.profilable import not_profilable, refuse_unprofilable
from dooly.profile.replay import NotReplayable, materialize, request_vars_of
from dooly.profile.timing import measure
from dooly.records import COLLECTIVE, FREE, STATEFUL, STATELESS
from dooly.trace.records import REQUEST_VARS, Trace

GROUP_START_S = 30.0  # rough cost of starting a tensor-parallel group (every rank imports the engine)



@dataclass
class SignatureWork:
    signature: str
    op: str
    text: str  # canonical signature JSON
    variables: tuple  # request variables it depends on
    points: list  # point keys of the grid
    models: list  # models that run it
    kind: str = STATELESS  # STATELESS: replayed from the signature; STATEFUL: through the engine's own set-up;
    #                        COLLECTIVE: between real ranks (points over the same grid as stateless ops)
    attrs: dict = field(default_factory=dict)  # kernel identity (stateful: backend, heads, block size, ...;
    #                                             collective: world_size)
    config: dict = field(default_factory=dict)  # stateful: config.json of the first model that runs it


@dataclass
class ProfilePlan:
    env: Environment
    grid: str
    limits: Limits
    models: list
    work: list  # SignatureWork per profiled signature
    needs: dict  # model -> set of (signature, point key)
    stored: dict  # (signature, point key) -> Measurement already in the database
    deferred: dict  # signature -> (op, kind) of ops this stage does not profile (unsupported ones)
    resumed: frozenset = frozenset()  # stored (signature, point key)s measured by runs that did not finish
    scales: dict = field(default_factory=dict)  # op (and "*": any op) -> stored cost / rough estimate, here

    @property
    def missing(self) -> list[tuple[SignatureWork, str]]:
        return [(w, p) for w in self.work for p in w.points if (w.signature, p) not in self.stored]

    def kept(self) -> tuple[int, int, float]:
        """Points the database already answers: (reused, kept from an unfinished run, the latter's
        device-seconds). A point an interrupted run measured is that run's work resumed, not reuse."""
        held = [(w.signature, p) for w in self.work for p in w.points if (w.signature, p) in self.stored]
        resumed = [k for k in held if k in self.resumed]
        return len(held) - len(resumed), len(resumed), sum(self.stored[k].cost_s for k in resumed)

    def estimate_s(self) -> float:
        """Device-seconds the missing points will take: a rough cost per point, scaled by what the points
        this machine already measured cost against the same rough estimate (per op where it has that op)."""
        missing = self.missing
        group = GROUP_START_S if any(w.kind == COLLECTIVE for w, _ in missing) else 0.0
        overall = self.scales.get("*", 1.0)
        return group + sum(self.scales.get(w.op, overall) * _estimate_point_s(w.text, parse_point(p))
                           for w, p in missing)


def cost_scales(stored: dict, signatures: dict[str, tuple[str, str]]) -> dict[str, float]:
    """Per op, and over all ops ("*"): the device-seconds the stored points took / their rough estimate.
    `signatures`: id -> (op, canonical text) of the stored signatures."""
    sums: dict[str, list[float]] = {}
    for (sig, p), m in stored.items():
        if sig not in signatures:
            continue
        op, text = signatures[sig]
        rough = _estimate_point_s(text, parse_point(p))
        for key in (op, "*"):
            acc = sums.setdefault(key, [0.0, 0.0])
            acc[0] += m.cost_s
            acc[1] += rough
    return {k: cost / rough for k, (cost, rough) in sums.items() if cost > 0 and rough > 0}


@dataclass
class ProfileSummary:
    models: list
    signatures: int  # profiled signatures (stateless and stateful) over all models
    signatures_measured: int  # with at least one point measured now
    signatures_reused: int  # fully answered by the database
    points_measured: int
    points_reused: int
    device_s: float  # spent by this run
    baseline_s: float  # a per-model profiler without reuse (same grid, method)
    points_resumed: int = 0  # stored by an earlier run of these models that did not finish
    resumed_s: float = 0.0  # the device-seconds those cost
    failed: dict = field(default_factory=dict)  # signature -> reason
    deferred: int = 0  # signatures this stage does not profile (unsupported ones)
    run_id: int | None = None
    collective_ranks: list = field(default_factory=list)  # set-up of each rank that measured collectives

    @property
    def saved_pct(self) -> float:
        return 100.0 * (1 - (self.device_s + self.resumed_s) / self.baseline_s) if self.baseline_s > 0 else 0.0


def plan_profile(traces: list[Trace], env: Environment, stored: dict, grid: str = "full",
                 limits: Limits = Limits()) -> ProfilePlan:
    for t in traces:
        refuse_unprofilable(t, "profile")
    work: dict[str, SignatureWork] = {}
    needs: dict[str, set] = {}
    deferred: dict[str, tuple] = {}
    for t in traces:
        need = needs.setdefault(t.model, set())
        eng = get_engine(t.engine)
        stateful, collectives = eng.stateful, eng.collectives
        for g in t.groups():
            kind = eng.classify(g.op, g.attrs)
            if kind == STATEFUL and (stateful is None or g.op not in stateful.STATEFUL_OPS):
                kind = "stateful-unsupported"  # no engine-side set-up for it yet: listed, not dropped
            if kind == COLLECTIVE and (collectives is None or g.op not in collectives.COLLECTIVE_OPS):
                kind = "collective-unsupported"
            if kind not in (STATELESS, STATEFUL, COLLECTIVE):
                if kind != FREE:
                    deferred[g.signature] = (g.op, kind)
                continue
            if kind == COLLECTIVE and env.tensor_parallel_size != t.tensor_parallel_size:
                # a collective's signature holds its shapes, not its group: the environment must
                size = t.tensor_parallel_size
                raise DoolyError(f"{t.model} is traced at tensor_parallel_size={size} but the environment is for "
                                 f"{env.tensor_parallel_size}: build it with current_environment(..., {size})")
            if g.signature not in work:
                if kind in (STATELESS, COLLECTIVE):
                    variables = request_vars_of(g.signature_text, REQUEST_VARS)
                    pts = points(variables, grid, limits)
                else:
                    attrs = dict(g.attrs)
                    max_len = min(limits.max_model_len, t.config.get("max_position_embeddings") or limits.max_model_len)
                    pts = stateful.stateful_points(g.op, grid, limits.max_num_batched_tokens, limits.max_num_seqs,
                                                   max_len, stateful.kv_token_budget(attrs, t.dtype))
                    variables = tuple(sorted({k for p in pts for k in p}))
                attrs = {"world_size": t.tensor_parallel_size} if kind == COLLECTIVE else dict(g.attrs)
                work[g.signature] = SignatureWork(g.signature, g.op, g.signature_text, variables,
                                                  [point_key(p) for p in pts], [], kind,
                                                  attrs, t.config if kind == STATEFUL else {})
            w = work[g.signature]
            if t.model not in w.models:
                w.models.append(t.model)
            need.update((g.signature, p) for p in w.points)
    return ProfilePlan(env, grid, limits, [t.model for t in traces], list(work.values()), needs,
                       stored, deferred)


def _estimate_point_s(text: str, values: dict) -> float:
    """Rough cost of measuring one point: ~0.2 s of timed calls, at least 8 calls, plus set-up."""
    from dooly.trace.instantiate import evaluate

    if not any(k in REQUEST_VARS for k in values) and values:  # a stateful batch composition
        return 0.3
    sig = json.loads(text)
    shapes = [[evaluate(d, values) for d in a["t"]] for a in sig["args"] if "t" in a]
    nbytes = sum(2 * math.prod(s) for s in shapes)
    flops = 0
    if sig["op"] in ("_C::onednn_mm", "_C::weight_packed_linear", "aten::mm", "aten::linear", "aten::addmm") \
            and len(shapes) >= 2:
        m, n = shapes[0][0], shapes[0][-1]
        k = shapes[1][-1]
        flops = 2 * m * n * k
    call = max(5e-6, flops / 4e10 + nbytes / 1e10)
    return max(0.2, 8 * call) + 0.02



def run_profile(plan: ProfilePlan, db: LatencyDB, progress: Callable[[str, int, int], None] | None = None,
                collectives=None, run_id: int | None = None) -> ProfileSummary:
    """Measure what the plan lacks, storing each point as soon as it is measured.

    collectives: a started group (the engine's `CollectiveProfiler`) to measure collectives with;
    by default one is started at the first collective point this run lacks and closed at its end.
    run_id: store the points under this run, which another process started and keeps the books
    of (a shard of a distributed run); by default the run is started and finished here.
    """
    eng = get_engine(plan.env.engine)
    eng.load_replay_rules()
    env_key = db.ensure_environment(plan.env)
    db.add_signatures({w.signature: (w.op, w.text) for w in plan.work})
    own_run = run_id is None
    if own_run:
        run_id = db.start_run(env_key, plan.models)
    torch.set_num_threads(plan.env.threads)
    stateful = None
    if any(w.kind == STATEFUL for w in plan.work):
        limits = plan.limits
        stateful = eng.stateful.StatefulProfiler(
            plan.env.dtype, limits.max_num_batched_tokens, limits.max_num_seqs)
    group, own_group = collectives, collectives is None
    costs = {k: m.cost_s for k, m in plan.stored.items()}
    measured, failed = 0, {}
    spent = 0.0
    # collectives last: the group's ranks then live for one stretch, with nothing else running
    todo = sorted(plan.missing, key=lambda wp: wp[0].kind == COLLECTIVE)
    status = "interrupted"
    reused_points, resumed_points, resumed_s = plan.kept()
    try:
        for i, (w, p) in enumerate(todo):
            if progress:
                progress(w.op, i, len(todo))
            if w.signature in failed:
                continue
            other = db.points(env_key, w.signature).get((w.signature, p))
            if other is not None:  # a concurrent profiler stored it meanwhile
                costs[(w.signature, p)] = other.cost_s
                continue
            values = parse_point(p)
            try:
                if w.kind == COLLECTIVE:
                    if group is None:
                        group = eng.collectives.CollectiveProfiler(w.attrs["world_size"],
                                                                                 plan.env.threads)
                    if group.world_size != w.attrs["world_size"]:
                        raise DoolyError(f"the group has {group.world_size} ranks, the trace {w.attrs['world_size']}")
                    m = group.measure(w.signature, w.text, values)  # the first one carries the start-up
                else:
                    if w.kind == STATEFUL:
                        t = measure(stateful.make_call(w.op, w.config, w.attrs, values))
                    else:
                        t = measure(lambda: materialize(w.text, values))
                    m = Measurement(w.signature, p, t.median_us, t.p25_us, t.p75_us, t.repeats, t.cost_s)
            except (NotReplayable, DoolyError, RuntimeError, TypeError, ValueError, IndexError) as e:
                failed[w.signature] = f"{w.op}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                continue
            spent += m.cost_s
            if db.add_measurement(env_key, m, run_id):
                measured += 1
                costs[(w.signature, p)] = m.cost_s
            else:  # stored by a concurrent profiler between our check and our write
                costs[(w.signature, p)] = db.points(env_key, w.signature)[(w.signature, p)].cost_s
            if own_run:
                db.update_run(run_id, measured=measured, device_s=spent)
        if progress:
            progress("", len(todo), len(todo))
        status = "incomplete" if failed else "done"
    finally:
        ranks = [asdict(r) for r in group.ranks] if group is not None else []
        if own_group and group is not None:
            group.close()
        baseline = sum(costs.get(k, 0.0) for need in plan.needs.values() for k in need)
        if own_run:
            db.update_run(run_id, finished=time.time(), measured=measured, reused=reused_points, device_s=spent,
                          baseline_s=baseline, status=status)
    return ProfileSummary(
        models=plan.models, signatures=len(plan.work),
        signatures_measured=len({w.signature for w, p in todo if w.signature not in failed}),
        signatures_reused=len(plan.work) - len({w.signature for w, _ in todo}),
        points_measured=measured, points_reused=reused_points, device_s=spent, baseline_s=baseline,
        points_resumed=resumed_points, resumed_s=resumed_s, failed=failed, deferred=len(plan.deferred),
        run_id=run_id, collective_ranks=ranks)
