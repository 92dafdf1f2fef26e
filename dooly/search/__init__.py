"""Search stage: goodput of engine configurations under an SLO, and capacity planning from it.

    slo.py     SLO targets: parsing, checking a simulation, proving a violation early
    grid.py    engine-option grids and their validation (values, vLLM's own config checks)
    sweep.py   one configuration: the rate search over simulations, shared step predictors
    fanout.py  configurations in-process or as Ray tasks (same results)
    core.py    search(...) and capacity(...) -> DataFrames
    plots.py   the Pareto plot (goodput per device vs latency)
"""

from dooly.search.core import NoConfiguration, SearchResult, capacity, search
from dooly.search.grid import Configuration, parse_grid
from dooly.search.slo import Slo, Target, parse_slo
from dooly.search.sweep import Sweep

__all__ = ["Configuration", "NoConfiguration", "SearchResult", "Slo", "Sweep", "Target", "capacity", "parse_grid",
           "parse_slo", "search"]
