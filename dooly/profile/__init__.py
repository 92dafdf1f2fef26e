"""Profile stage: measure the operation signatures the latency database lacks."""

from dooly.profile.environment import current_environment, default_threads
from dooly.profile.grid import GRIDS, Limits
from dooly.profile.runner import ProfilePlan, ProfileSummary, plan_profile, run_profile

__all__ = ["GRIDS", "Limits", "ProfilePlan", "ProfileSummary", "current_environment",
           "default_threads", "plan_profile", "run_profile"]
