"""Labelling a model's ops: one engine run under the real config, differential runs for labels, signatures.

    engine run (real config)  ─┐
    engine run (perturbed 1)  ─┼─ align op lists ─ label every dim ─ signatures ─ Trace
    engine run (perturbed 2)  ─┘
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import sympy

from dooly.catalog import ModelSpec
from dooly.engine_interface import RunResult, get_engine
from dooly.errors import DoolyError
from dooly.trace.labels import Solver, config_params, perturbed_config
from dooly.trace.records import REQUEST_VARS, ArgSpec, RawArg, RawOp, Trace, TracedOp

PERTURBED_RUNS = 2
REDUCED_LAYERS = 2  # perturbed runs use 2 layers when every later layer repeats layer 1 exactly

_REQ = {n: sympy.Symbol(n, integer=True, positive=True) for n in REQUEST_VARS}


def _rename(run: RunResult):
    mapping = {sym: _REQ[name] for sym, name in run.symbols.items()}

    def conv(x):
        return sympy.sympify(x).xreplace(mapping) if not isinstance(x, int) else x

    return conv


def _segments(ops: list[RawOp]) -> list[tuple[tuple, list[int]]]:
    """Consecutive runs of op indices by (phase, decoder layer); layer None = outside the layers."""
    segs: list[tuple[tuple, list[int]]] = []
    for i, op in enumerate(ops):
        key = (op.phase, op.layer)
        if segs and segs[-1][0] == key:
            segs[-1][1].append(i)
        else:
            segs.append((key, [i]))
    return segs


def _strip(op: RawOp):
    return (op.op, op.args, op.attrs, op.phase)


def _reducible(ops: list[RawOp], num_layers: int) -> bool:
    """In every phase, does every layer from 1 on run exactly what layer 1 runs (ops, shapes, attrs)?"""
    if num_layers <= REDUCED_LAYERS:
        return False
    by_phase: dict[str, list[list[int]]] = {}
    for (phase, layer), idx in _segments(ops):
        if layer is not None:
            if layer != len(by_phase.setdefault(phase, [])):
                return False  # layers interleave or repeat: keep every layer in the perturbed runs
            by_phase[phase].append(idx)
    for layers in by_phase.values():
        if len(layers) != num_layers:
            return False
        ref = [_strip(ops[i]) for i in layers[REDUCED_LAYERS - 1]]
        if any([_strip(ops[i]) for i in idx] != ref for idx in layers[REDUCED_LAYERS:]):
            return False
    return True


def _align(real: list[RawOp], other: list[RawOp], reduced: bool) -> list[int]:
    """For each op of the real run, the index of the same op in a perturbed run."""
    if not reduced:
        if [o.op for o in real] != [o.op for o in other]:
            raise DoolyError("a perturbed trace ran different operations; labels cannot be established")
        return list(range(len(real)))
    by_layer = {key: idx for key, idx in _segments(other) if key[1] is not None}
    outside = [idx for key, idx in _segments(other) if key[1] is None]
    mapping: list[int] = []
    k = 0
    for (phase, layer), idx in _segments(real):
        if layer is None:
            target = outside[k] if k < len(outside) else []
            k += 1
        else:
            target = by_layer.get((phase, min(layer, REDUCED_LAYERS - 1)), [])
        if [real[i].op for i in idx] != [other[j].op for j in target]:
            raise DoolyError("a perturbed trace ran different operations; labels cannot be established")
        mapping.extend(target)
    return mapping


class _Labeller:
    def __init__(self, solver: Solver, params: dict[str, int]):
        self.solver = solver
        self.params = {solver.symbols[k]: v for k, v in params.items()}
        self.unresolved = 0
        self._memo: dict[tuple, tuple[str, int]] = {}
        self._concrete: dict[str, str] = {}

    def value(self, values: list) -> str:
        """Label one size seen across runs (memoised: the same sizes recur in every layer)."""
        key = tuple(values)
        if key not in self._memo:
            before = self.unresolved
            text = self._value(values)
            self._memo[key] = (text, self.unresolved - before)
            self.unresolved = before
        text, missed = self._memo[key]
        self.unresolved += missed
        return text

    def _value(self, values: list) -> str:
        """Label one size seen across runs: ints and/or polynomials in request variables."""
        if all(isinstance(v, int) or (isinstance(v, sympy.Basic) and v.is_Integer) for v in values):
            text, ok = self.solver.label(tuple(int(v) for v in values))
            self.unresolved += not ok
            return text
        exprs = [sympy.expand(sympy.sympify(v)) for v in values]
        req = sorted(set().union(*(e.free_symbols for e in exprs)), key=str)
        try:
            polys = [sympy.Poly(e, *req).as_dict() for e in exprs]
        except sympy.PolynomialError:
            polys = None
        if polys is None or any(set(p) != set(polys[0]) for p in polys):
            if all(e == exprs[0] for e in exprs):
                return str(exprs[0])
            self.unresolved += 1
            return f"?{exprs[0]}"
        out = sympy.Integer(0)
        for monom in polys[0]:
            coeff, ok = self.solver.label(tuple(int(p[monom]) for p in polys))
            self.unresolved += not ok
            term = sympy.sympify(coeff.lstrip("?"), locals=self.solver.symbols)
            for sym, power in zip(req, monom):
                term = term * sym**power
            out = out + term
        return str(out)

    def arg(self, args: list[RawArg]) -> ArgSpec:
        return dataclasses.replace(self._arg(args), name=args[0].name)

    def _arg(self, args: list[RawArg]) -> ArgSpec:
        a = args[0]
        if a.kind == "tensor":
            if any(len(x.shape) != len(a.shape) for x in args):
                self.unresolved += len(a.shape)
                return ArgSpec("tensor", tuple(f"?{d}" for d in a.shape), a.dtype, a.contiguous)
            dims = tuple(self.value([x.shape[d] for x in args]) for d in range(len(a.shape)))
            strides: tuple = ()
            if a.strides:
                if any(len(x.strides) != len(a.strides) for x in args):
                    self.unresolved += len(a.strides)
                    strides = tuple(f"?{d}" for d in a.strides)
                else:
                    strides = tuple(self.value([x.strides[d] for x in args]) for d in range(len(a.strides)))
            return ArgSpec("tensor", dims, a.dtype, a.contiguous, strides)
        if a.kind in ("int", "ints"):
            if any(len(x.ints) != len(a.ints) for x in args):
                self.unresolved += len(a.ints)
                return ArgSpec(a.kind, tuple(f"?{d}" for d in a.ints))
            return ArgSpec(a.kind, tuple(self.value([x.ints[d] for x in args]) for d in range(len(a.ints))))
        if a.kind == "tensors":
            if any(len(x.items) != len(a.items) for x in args):
                self.unresolved += 1
                return ArgSpec("tensors", items=tuple(self._arg([i]) for i in a.items))
            return ArgSpec("tensors", items=tuple(self._arg([x.items[k] for x in args]) for k in range(len(a.items))))
        return ArgSpec("const", value=a.value)

    def concrete(self, text: str) -> str:
        """A label with config parameters replaced by this model's values (request vars stay)."""
        if text.startswith("?"):
            return text[1:]
        if text not in self._concrete:
            expr = sympy.sympify(text, locals={**self.solver.symbols, **_REQ})
            self._concrete[text] = str(expr.xreplace(self.params))
        return self._concrete[text]


def _signature_text(op: str, args: tuple[ArgSpec, ...], attrs: tuple, lab: _Labeller) -> str:
    def conc(a: ArgSpec):
        if a.kind == "tensor":
            out = {"t": [lab.concrete(d) for d in a.dims], "dtype": a.dtype, "contig": a.contiguous}
            if a.strides:
                out["strides"] = [lab.concrete(d) for d in a.strides]
        elif a.kind in ("int", "ints"):
            out = {a.kind: [lab.concrete(d) for d in a.dims]}
        elif a.kind == "tensors":
            out = {"items": [conc(i) for i in a.items]}
        else:
            out = {"c": a.value}
        if a.name:
            out["name"] = a.name
        return out

    return json.dumps({"op": op, "args": [conc(a) for a in args], "attrs": [list(kv) for kv in attrs]},
                      sort_keys=True, separators=(",", ":"), default=str)


def signature_id(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def trace_runs(spec: ModelSpec, engine: str, tensor_parallel_size: int, dtype: str, params: dict,
               kwargs: dict) -> Trace:
    """Run the engine under the real config and the perturbed ones, align the runs, label every dim."""
    eng = get_engine(engine)
    start = time.perf_counter()
    real = eng.run_trace(spec.config, tensor_parallel_size=tensor_parallel_size, dtype=dtype, **kwargs)
    if real.specialized:
        raise DoolyError(f"the engine pinned request variables {real.specialized} to constants")
    num_layers = spec.config["num_hidden_layers"]
    reduced = _reducible(real.ops, num_layers)
    notes = [f"{engine}: labels from 1 real + {PERTURBED_RUNS} perturbed-config runs"
             + (f" ({REDUCED_LAYERS} layers each: layers 1..{num_layers - 1} are identical)" if reduced else "")]
    runs, param_runs = [real], [params]
    for r in range(1, PERTURBED_RUNS + 1):
        cfg_r, tp_r = perturbed_config(spec.config, tensor_parallel_size, r, REDUCED_LAYERS if reduced else None)
        # the perturbed sizes may cross the engine's kernel-dispatch thresholds: pin the real run's kernels
        pinned = {"pinned": real.dispatch} if real.dispatch else {}
        # options that change kernels but no traced shape stay with the real run (a kernel may refuse
        # a perturbed size, e.g. an FP8 KV cache at a head size it lacks)
        shaped = {k: v for k, v in kwargs.items() if k not in eng.shape_free_options}
        runs.append(eng.run_trace(cfg_r, tensor_parallel_size=tp_r, dtype=dtype, **shaped, **pinned))
        param_runs.append(config_params(cfg_r, tp_r))
    maps = [list(range(len(real.ops)))] + [_align(real.ops, r.ops, reduced) for r in runs[1:]]
    convs = [_rename(r) for r in runs]
    solver = Solver(param_runs)
    lab = _Labeller(solver, params)
    traced: list[TracedOp] = []
    for i, op in enumerate(real.ops):
        before = lab.unresolved
        per_run = [runs[k].ops[maps[k][i]] for k in range(len(runs))]
        args = []
        for j in range(len(op.args)):
            raw = [_convert(p.args[j], convs[k]) for k, p in enumerate(per_run)]
            args.append(lab.arg(raw))
        args_t = tuple(args)
        text = _signature_text(op.op, args_t, op.attrs, lab)
        traced.append(TracedOp(op.op, op.module, op.phase, args_t, op.attrs, signature_id(text), text,
                               lab.unresolved - before))
    by_name = {str(sym): _REQ[name] for sym, name in real.symbols.items()}
    guards = sorted({str(sympy.sympify(g, locals=by_name)) for g in real.guards})
    return Trace(
        model=spec.name,
        engine=engine,
        engine_version=eng.version(),
        tensor_parallel_size=tensor_parallel_size,
        dtype=dtype,
        config_params=params,
        config=spec.config,
        request_vars=eng.request_vars,
        ops=traced,
        unresolved=lab.unresolved,
        guards=guards,
        notes=notes,
        seconds=time.perf_counter() - start,
        dispatch_key=real.dispatch_key,
    )


def _convert(a: RawArg, conv) -> RawArg:
    if a.kind == "tensor":
        return dataclasses.replace(a, shape=tuple(conv(d) for d in a.shape), strides=tuple(conv(d) for d in a.strides))
    if a.kind in ("int", "ints"):
        return dataclasses.replace(a, ints=tuple(conv(d) for d in a.ints))
    if a.kind == "tensors":
        return dataclasses.replace(a, items=tuple(_convert(i, conv) for i in a.items))
    return a
