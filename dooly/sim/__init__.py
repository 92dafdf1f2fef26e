"""Sim stage: serving simulation in virtual time."""

from dooly.sim.core import RequestResult, RequestSpec, StepResult, simulate

__all__ = ["RequestResult", "RequestSpec", "StepResult", "simulate"]
