"""Profile stage: measure the operation signatures the latency database lacks.

Its names are imported on first use: reading the environment key (`dooly.profile.environment`, as
every simulation does) must not import torch, which the runner needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dooly.registry import lazy_exports

_EXPORTS = {"current_environment": "dooly.profile.environment", "default_threads": "dooly.profile.environment",
            "GRIDS": "dooly.profile.grid", "Limits": "dooly.profile.grid", "ProfilePlan": "dooly.profile.runner",
            "ProfileSummary": "dooly.profile.runner", "plan_profile": "dooly.profile.runner",
            "run_profile": "dooly.profile.runner"}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from dooly.profile.environment import current_environment, default_threads
    from dooly.profile.grid import GRIDS, Limits
    from dooly.profile.runner import ProfilePlan, ProfileSummary, plan_profile, run_profile


__getattr__ = lazy_exports(__name__, _EXPORTS)
