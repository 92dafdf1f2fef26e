"""Validate stage: the real engine and the simulator on the same workload, compared."""

from dooly.validate.core import VALIDATION_OPTIONS, WorkloadValidation, compare, validate, write_validation

__all__ = ["VALIDATION_OPTIONS", "WorkloadValidation", "compare", "validate", "write_validation"]
