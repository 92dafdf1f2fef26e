"""Exact dimension provenance by differential tracing.

Request-dependent sizes are symbolic in every trace (ShapeEnv symbols renamed to `num_tokens`, ...),
so they can never be confused with a config value, whatever the example sizes. Config-derived sizes
come out of the engine as integers; their origin is established by tracing the same model code again
under perturbed configs in which every config parameter takes a different value, and taking the
simplest expression over config parameters that reproduces the value in *every* run. A size that no
candidate explains, or that two equally simple candidates explain, is reported unresolved.
"""

from __future__ import annotations

import copy
import itertools
import math
from fractions import Fraction

import sympy

from dooly.trace.params import config_params

CPU_HEAD_DIMS = (64, 80, 96, 112, 128, 160, 192, 256)


def perturbed_config(config: dict, tp: int, run: int, num_layers: int | None) -> tuple[dict, int]:
    """Run `run` (1, 2, ...) of the differential trace: every config parameter moved to a new value.

    Constraints kept: heads divisible by kv heads, both by tp (or tp by kv heads, when the real
    model has fewer KV heads than ranks and vLLM replicates them); hidden_size divisible by heads;
    a head size the CPU attention kernels accept; 32-aligned
    hidden and FFN sizes (CPU MoE kernels); vocab padded to 64 still divisible by tp.
    """
    c = copy.deepcopy(config)
    real = config_params(config, tp)
    tp_r = tp if tp == 1 else tp + run  # tp=2 -> 3, 4: tp must vary too, or /tp is invisible
    if real["num_key_value_heads"] < tp:  # fewer KV heads than ranks: vLLM replicates them, one per rank
        kv = next((p for p in range(2, tp_r) if tp_r % p == 0), 1)  # replicated in the perturbed run too
        heads = tp_r * (run + 1)
    else:
        kv = tp_r * (2 * run + 1)  # 3, 5 (x tp)
        heads = kv * (run + 1)  # groups of 2, 3
    head_dim = [d for d in (80, 96, 112, 64) if d != real["head_dim"]][run - 1]
    c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"] = heads, kv, head_dim
    # hidden/heads != head_dim tells the two apart; multiples of 32 keep CPU MoE kernels eligible
    c["hidden_size"] = heads * 32 * (head_dim // 32 + 1)
    if "intermediate_size" in real:
        c["intermediate_size"] = tp_r * 32 * (23, 29, 31)[run - 1]
    # vLLM pads the vocabulary to 64 and slices logits back only when padding was needed:
    # keep the real model's side of that branch (and padded size divisible by tp).
    c["vocab_size"] = 64 * tp_r * (17, 19, 23)[run - 1] - (5 if real["vocab_size"] % 64 else 0)
    if "max_position_embeddings" in real:
        c["max_position_embeddings"] = real["max_position_embeddings"] + 100 * run + 28
        if c.get("original_max_position_embeddings") == real["max_position_embeddings"]:
            c["original_max_position_embeddings"] = c["max_position_embeddings"]
    if "num_local_experts" in real:
        c["num_local_experts"] = (5, 7, 11)[run - 1]
    if "num_experts_per_tok" in real:
        c["num_experts_per_tok"] = (3, 4, 5)[run - 1]
    for key, primes in (("moe_intermediate_size", (37, 41)), ("shared_expert_intermediate_size", (43, 47))):
        if key in real:
            c[key] = tp_r * 32 * primes[run - 1]
    if "sliding_window" in real:
        c["sliding_window"] = real["sliding_window"] + 64 * run + 32
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # keep token ids inside the vocabulary
        if key in c and c[key] is not None:
            c[key] = 1 if key == "bos_token_id" else 2
    if num_layers is not None:
        c["num_hidden_layers"] = num_layers
        for key in ("max_window_layers",):
            if key in c:
                c[key] = min(c[key], num_layers)
    return c, tp_r


class Solver:
    """Maps a tuple of per-run integer values to the simplest config expression producing it."""

    def __init__(self, runs: list[dict[str, int]]):
        self.runs = runs
        self.symbols = {n: sympy.Symbol(n, integer=True, positive=True) for n in runs[0]}
        self.table: dict[tuple, tuple[float, list[str]]] = {}
        self._build()

    def _add(self, score: float, expr, values: list[Fraction]) -> None:
        if any(v.denominator != 1 or v <= 0 for v in values):
            return
        key = tuple(int(v) for v in values)
        best = self.table.get(key)
        if best is None or score < best[0]:
            self.table[key] = (score, [expr])
        elif score == best[0] and all(expr != e for e in best[1]):
            best[1].append(expr)

    def _build(self) -> None:
        names = [n for n in self.runs[0] if n != "tp"]
        S = self.symbols
        vals = {n: [Fraction(r[n]) for r in self.runs] for n in self.runs[0]}
        R = range(len(self.runs))
        base: list[tuple[float, object, list[Fraction]]] = []
        for k in (1, 2, 3):
            for combo in itertools.combinations_with_replacement(names, k):
                expr = sympy.Mul(*[S[n] for n in combo])
                base.append((k, expr, [math.prod((vals[n][i] for n in combo), start=Fraction(1)) for i in R]))
        for a, b in itertools.permutations(names, 2):
            base.append((2.5, S[a] / S[b], [vals[a][i] / vals[b][i] for i in R]))
            for c in names:
                if c not in (a, b) and a <= c:
                    base.append((3.5, S[a] * S[c] / S[b], [vals[a][i] * vals[c][i] / vals[b][i] for i in R]))
        # fused projections: (q heads + c * kv heads) * per-head size, the latter as config.head_dim
        # or as hidden_size/num_attention_heads (models whose code derives it)
        H, K, D, E = "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size"
        per_head = [(S[D], vals[D]), (S[E] / S[H], [vals[E][i] / vals[H][i] for i in R])]
        for a, b in ((H, K), (K, H)):
            for c in (1, 2):
                expr = S[a] + c * S[b]
                v = [vals[a][i] + c * vals[b][i] for i in R]
                base.append((3 + (c != 1), expr, v))
                for n, (pe, pv) in enumerate(per_head):
                    base.append((4 + (c != 1) + n, expr * pe, [v[i] * pv[i] for i in R]))
        for c in (1, 2):  # fused projections with replicated KV heads: one KV head per rank
            v = [vals[H][i] / vals["tp"][i] + c for i in R]
            for n, (pe, pv) in enumerate(per_head):
                base.append((6 + n, (S[H] / S["tp"] + c) * pe, [v[i] * pv[i] for i in R]))
        vocab = "vocab_size"
        for pad_to in (64,):
            expr = pad_to * sympy.ceiling(S[vocab] / pad_to)
            base.append((2, expr, [Fraction(pad_to * math.ceil(vals[vocab][i] / pad_to)) for i in R]))
        tp = vals["tp"]
        for score, expr, v in base:
            for coeff in (1, 2, 3, 4, sympy.Rational(1, 2)):
                cv = [Fraction(int(coeff.p), int(coeff.q)) * x if isinstance(coeff, sympy.Rational) else coeff * x
                      for x in v]
                self._add(score + (coeff != 1), coeff * expr, cv)
                self._add(score + (coeff != 1) + 1, coeff * expr / S["tp"], [cv[i] / tp[i] for i in R])
                self._add(score + (coeff != 1) + 1, coeff * expr * S["tp"], [cv[i] * tp[i] for i in R])
        self._add(1, S["tp"], list(tp))
        for n in names:  # offsets of rank 0's shard end in a sharded dim (e.g. vLLM's vocab masking)
            self._add(3, S[n] - S[n] / S["tp"], [vals[n][i] - vals[n][i] / tp[i] for i in R])

    def label(self, values: tuple[int, ...]) -> tuple[str, bool]:
        """(expression, resolved). A value equal in every run is a literal constant of the code."""
        if len(set(values)) == 1:
            return str(values[0]), True
        hit = self.table.get(tuple(values))
        if hit is None and min(values) > 4:
            # int8 weights VNNI-packed for the SGL kernels (`_C::convert_weight_packed`) carry a 4-byte
            # compensation term per row: K + 4
            padded = self.table.get(tuple(v - 4 for v in values))
            if padded is not None and len(padded[1]) == 1:
                return f"{padded[1][0]} + 4", True
        if hit is None or len(hit[1]) > 1:
            return f"?{values[0]}", False
        return str(hit[1][0]), True
