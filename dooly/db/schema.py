"""Tables of the latency database (SQLAlchemy Core; SQLite or PostgreSQL)."""

from __future__ import annotations

from sqlalchemy import (Column, Float, ForeignKey, Integer, MetaData, PrimaryKeyConstraint, String, Table,
                        Text)

SCHEMA_VERSION = "1"

metadata = MetaData()

meta = Table(
    "dooly_meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

environments = Table(
    "environments", metadata,
    Column("key", String(16), primary_key=True),  # Environment.key
    Column("fields", Text, nullable=False),  # Environment as JSON
)

signatures = Table(
    "signatures", metadata,
    Column("id", String(16), primary_key=True),  # hash of `text`
    Column("op", String(200), nullable=False),
    Column("text", Text, nullable=False),  # canonical signature JSON (config dims as values)
)

measurements = Table(
    "measurements", metadata,
    Column("env", String(16), ForeignKey("environments.key"), nullable=False),
    Column("signature", String(16), ForeignKey("signatures.id"), nullable=False),
    Column("point", String(200), nullable=False),  # "num_reqs=4,num_tokens=128"
    Column("median_us", Float, nullable=False),
    Column("p25_us", Float, nullable=False),
    Column("p75_us", Float, nullable=False),
    Column("repeats", Integer, nullable=False),
    Column("cost_s", Float, nullable=False),  # device-seconds spent measuring this point
    Column("run_id", Integer, nullable=True),
    Column("created", Float, nullable=False),  # unix time
    PrimaryKeyConstraint("env", "signature", "point"),  # one point once: no duplicates, ever
)

fits = Table(
    "fits", metadata,
    Column("env", String(16), ForeignKey("environments.key"), nullable=False),
    Column("signature", String(16), ForeignKey("signatures.id"), nullable=False),
    Column("data_hash", String(40), nullable=False),  # hash of the points the fit was made from
    Column("model", Text, nullable=False),  # regressor as JSON (never pickle)
    PrimaryKeyConstraint("env", "signature"),
)

runs = Table(
    "runs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("env", String(16), ForeignKey("environments.key"), nullable=False),
    Column("models", Text, nullable=False),  # JSON list
    Column("started", Float, nullable=False),
    Column("finished", Float, nullable=True),
    Column("measured", Integer, nullable=False, default=0),  # points measured by this run
    Column("reused", Integer, nullable=False, default=0),  # points found in the database
    Column("device_s", Float, nullable=False, default=0.0),  # device-seconds spent
    Column("baseline_s", Float, nullable=False, default=0.0),  # a per-model profiler without reuse
    Column("status", String(16), nullable=False),  # running | done | interrupted
)
