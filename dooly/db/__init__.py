"""Latency database: SQLite by default, PostgreSQL for teams (SQLAlchemy)."""

from dooly.db.records import Environment, Measurement, parse_point, point_key
from dooly.db.store import ENV_VAR, LatencyDB, NoDatabase, default_url, redact

__all__ = ["ENV_VAR", "Environment", "LatencyDB", "Measurement", "NoDatabase", "default_url", "redact", "parse_point", "point_key"]
