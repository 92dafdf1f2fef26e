"""Validate stage: the real engine and the simulator on the same workload, compared."""

from dooly.validate.core import WorkloadValidation, compare, validate, write_validation

__all__ = ["WorkloadValidation", "compare", "validate", "write_validation"]
