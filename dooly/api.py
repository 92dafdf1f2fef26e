"""The Python API: the pipeline's stage entries in one place (each returns records or pandas DataFrames).

    simulate(model, workload, ...)        dooly.sim.run         -> SimulationResult
    validate(model, workloads, ...)       dooly.validate        -> [WorkloadValidation]
    search(models, workload, slo, ...)    dooly.search          -> SearchResult
    capacity(model, rate, workload, ...)  dooly.search          -> (plan, SearchResult)
    calibrate(db, ...), calibrated(db)    dooly.predict.calibrate
    profile(models, ...)                  dooly.profile.stage   -> (ProfileSummary, database URL)
    export_vidur(model, out, ...)         dooly.export          -> VidurExport
    Deployment.resolve(model, ...)        dooly.deployment: a model x engine options, resolved once
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dooly.registry import lazy_exports

# name -> the module that defines it; imported on first use, so `import dooly.api` stays cheap (a
# simulation from cached traces never imports torch or vLLM)
_EXPORTS = {
    "DEFAULT_OPTIONS": "dooly.records", "EngineOptions": "dooly.records", "Deployment": "dooly.deployment",
    "SimulationResult": "dooly.sim.run", "model_context": "dooly.sim.run", "simulate": "dooly.sim.run",
    "simulate_deployment": "dooly.sim.run", "validate": "dooly.validate", "search": "dooly.search",
    "capacity": "dooly.search", "calibrate": "dooly.predict.calibrate", "calibrated": "dooly.predict.calibrate",
    "profile": "dooly.profile.stage", "export_vidur": "dooly.export", "parse_workload": "dooly.workload",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from dooly.deployment import Deployment
    from dooly.export import export_vidur
    from dooly.predict.calibrate import calibrate, calibrated
    from dooly.profile.stage import profile
    from dooly.records import DEFAULT_OPTIONS, EngineOptions
    from dooly.search import capacity, search
    from dooly.sim.run import SimulationResult, model_context, simulate, simulate_deployment
    from dooly.validate import validate
    from dooly.workload import parse_workload


__getattr__ = lazy_exports(__name__, _EXPORTS)
