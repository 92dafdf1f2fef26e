"""Turn labelled dims back into numbers for given config parameters and request variable values."""

from __future__ import annotations

from functools import lru_cache

import sympy

from dooly.trace.records import ArgSpec


@lru_cache(maxsize=4096)
def _parse(text: str):
    return sympy.sympify(text.lstrip("?"))


def evaluate(text: str, values: dict[str, int]) -> int:
    """Value of one dim label, e.g. `head_dim*(num_attention_heads + 2*num_key_value_heads)`."""
    expr = _parse(text)
    missing = {str(s) for s in expr.free_symbols} - set(values)
    if missing:
        raise KeyError(f"no value for {', '.join(sorted(missing))} in {text!r}")
    return int(expr.subs({sympy.Symbol(k): v for k, v in values.items() if sympy.Symbol(k) in expr.free_symbols}))


def tensor_shapes(args: tuple[ArgSpec, ...], values: dict[str, int]) -> list[tuple[int, ...]]:
    """Concrete shapes of every tensor argument (lists of tensors flattened), in order."""
    return [tuple(evaluate(d, values) for d in dims) for a in args for dims in a.tensor_dims()]

