"""The latency database: environments, signatures, measurements and profiling runs.

Every write commits at once, and a measurement is keyed by (environment, signature, point) with
insert-or-ignore, so a killed profiler loses nothing it stored, and concurrent profilers never
store a point twice.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from sqlalchemy import create_engine, event, func, inspect, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError

from dooly.db import schema as S
from dooly.db.records import Environment, Measurement
from dooly.errors import DoolyError

ENV_VAR = "DOOLY_DB"


def default_url() -> str:
    """$DOOLY_DB, else SQLite at $XDG_DATA_HOME/dooly/latency.db (~/.local/share/dooly/latency.db)."""
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return f"sqlite:///{base / 'dooly' / 'latency.db'}"


def _one_line(e: Exception) -> str:
    msg = str(getattr(e, "orig", None) or e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


def redact(url: str) -> str:
    """The URL as dooly shows it: a password is never echoed."""
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)


class NoDatabase(DoolyError):
    """The URL holds no dooly database yet (no file, an empty one, an in-memory one)."""


class LatencyDB:
    """A handle on one latency database URL.

    create=True: a writer (profile, calibrate) that may create the database and its tables.
    create=False: the database must exist and hold dooly's schema; a read-only SQLite file is opened
    read-only (`writable` is False and writes are refused).
    Nothing is written to a database before it is accepted: its schema is only read until then, and
    only a writer switches an SQLite file to write-ahead logging. The file itself is never opened
    outside SQLite: closing any descriptor of a file drops every POSIX lock this process holds on it,
    those of its open SQLite connections included.
    """

    def __init__(self, url: str | None = None, *, create: bool = True):
        if url is not None and not url.strip():
            raise DoolyError("empty database URL: give sqlite:///PATH or postgresql+psycopg://... "
                             "(or leave --db out for $DOOLY_DB / the default)")
        self.url = default_url() if url is None else url
        self.shown_url = redact(self.url)
        self.writable = True
        self.engine = self._connect(create)

    # -- opening ---------------------------------------------------------------------------------
    def _connect(self, create: bool) -> Engine:
        url = self.url
        if not (url.startswith("sqlite:") or url.startswith("postgresql:") or url.startswith("postgresql+")):
            raise DoolyError(f"malformed database URL {self.shown_url!r}: use sqlite:///PATH or "
                             f"postgresql+psycopg://...")
        try:
            if url.startswith("sqlite"):
                engine = self._sqlite_engine(url, create)
            else:
                engine = create_engine(url, pool_pre_ping=True)
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            self._check_schema(engine, create)  # reads only, until the database is accepted
        except DoolyError:
            raise
        except (ArgumentError, NoSuchModuleError, ValueError) as e:
            raise DoolyError(f"malformed database URL {self.shown_url!r}: {_one_line(e)}") from None
        except (OperationalError, DBAPIError) as e:
            if "not a database" in _one_line(e):
                raise DoolyError(f"{self.shown_url} is not an SQLite database; use another --db") from None
            raise DoolyError(f"cannot open database {self.shown_url!r}: {_one_line(e)}") from None
        if create and url.startswith("sqlite") and self.writable:
            # a writer's database: concurrent readers + one writer at a time (kept in the file)
            with engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        return engine

    def _sqlite_engine(self, url: str, create: bool) -> Engine:
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if not path or path == ":memory:":
            if not create:
                raise NoDatabase(f"{url} is an in-memory database and holds no measurements: "
                                 f"give a file, sqlite:///PATH")
            return create_engine(url)
        p = Path(path).expanduser()
        if p.exists():
            # mode bits too: root may write anything, but a file marked read-only is not ours to change
            self.writable = os.access(p, os.W_OK) and bool(p.stat().st_mode & 0o222)
            if create and not self.writable:
                raise DoolyError(f"database file {p} is read-only: dooly cannot store measurements in it")
            if p.stat().st_size == 0 and not create:  # an empty SQLite database: a writer may fill it
                raise NoDatabase(f"{p} is an empty file, not a dooly database (run `dooly profile` first)")
        else:
            if not create:
                raise NoDatabase(f"no database at {p} (run `dooly profile` first)")
            if p.parent.exists() and not os.access(p.parent, os.W_OK):
                raise DoolyError(f"cannot create database {p}: folder is read-only")
            p.parent.mkdir(parents=True, exist_ok=True)
        if not self.writable:
            return create_engine(f"sqlite:///file:{p}?mode=ro&uri=true", connect_args={"timeout": 60})
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        return engine

    def _check_schema(self, engine: Engine, create: bool) -> None:
        tables = set(inspect(engine).get_table_names())
        if S.meta.name in tables:
            with engine.connect() as conn:
                version = conn.execute(select(S.meta.c.value).where(S.meta.c.key == "schema_version")).scalar()
            if version != S.SCHEMA_VERSION:
                raise DoolyError(f"database schema version {version!r} is not {S.SCHEMA_VERSION!r} "
                                 f"(this dooly); use another --db")
            if create and {t.name for t in S.metadata.sorted_tables} - tables:
                S.metadata.create_all(engine)  # tables added within this schema version (e.g. fits)
            return
        if tables - {t.name for t in S.metadata.sorted_tables}:
            raise DoolyError(f"{self.shown_url} holds other tables and no dooly schema; use another --db")
        if not create:
            raise NoDatabase(f"{self.shown_url} holds no dooly database (run `dooly profile` first)")
        try:
            S.metadata.create_all(engine)
            with engine.begin() as conn:
                conn.execute(self._insert_ignore(S.meta, ["key"]).values(key="schema_version",
                                                                          value=S.SCHEMA_VERSION))
        except (OperationalError, DBAPIError) as e:
            raise DoolyError(f"cannot write database {self.shown_url!r}: {_one_line(e)}") from None

    def _insert_ignore(self, table, keys: list[str]):
        if self.url.startswith("sqlite"):
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        return insert(table).on_conflict_do_nothing(index_elements=keys)

    # -- environments -------------------------------------------------------------------------
    def ensure_environment(self, env: Environment) -> str:
        with self.engine.begin() as conn:
            conn.execute(self._insert_ignore(S.environments, ["key"]).values(key=env.key, fields=env.to_json()))
        return env.key

    def environments(self) -> list[Environment]:
        with self.engine.connect() as conn:
            return [Environment.from_json(r.fields) for r in conn.execute(select(S.environments.c.fields))]

    def require_environment(self, env: Environment) -> str:
        """The key of `env` if the database has data for it; else an error naming what differs."""
        known = self.environments()
        if any(e.key == env.key for e in known):
            return env.key
        if not known:
            raise DoolyError(f"the database {self.shown_url} holds no measurements yet (run `dooly profile`)")
        nearest = min(known, key=lambda e: len(env.differences(e)))
        diff = "; ".join(f"{k}: here {a!r}, stored {b!r}" for k, (a, b) in env.differences(nearest).items())
        raise DoolyError(f"no measurements for this environment; nearest stored one differs in {diff}")

    # -- signatures and measurements ----------------------------------------------------------
    def add_signatures(self, sigs: dict[str, tuple[str, str]]) -> None:
        """sigs: id -> (op, canonical text)."""
        if not sigs:
            return
        rows = [{"id": k, "op": op, "text": t} for k, (op, t) in sigs.items()]
        with self.engine.begin() as conn:
            conn.execute(self._insert_ignore(S.signatures, ["id"]), rows)

    def points(self, env_key: str, signature: str | None = None) -> dict[tuple[str, str], Measurement]:
        q = select(S.measurements).where(S.measurements.c.env == env_key)
        if signature is not None:
            q = q.where(S.measurements.c.signature == signature)
        with self.engine.connect() as conn:
            return {(r.signature, r.point): Measurement(r.signature, r.point, r.median_us, r.p25_us, r.p75_us,
                                                        r.repeats, r.cost_s)
                    for r in conn.execute(q)}

    def add_measurement(self, env_key: str, m: Measurement, run_id: int | None) -> bool:
        """Store one point (committed at once). False if another profiler stored it first."""
        with self.engine.begin() as conn:
            res = conn.execute(self._insert_ignore(S.measurements, ["env", "signature", "point"]).values(
                env=env_key, signature=m.signature, point=m.point, median_us=m.median_us, p25_us=m.p25_us,
                p75_us=m.p75_us, repeats=m.repeats, cost_s=m.cost_s, run_id=run_id, created=time.time())
                .returning(S.measurements.c.point))
            return res.first() is not None

    def replace_measurements(self, env: Environment, replacements: list[tuple[str, str, str, list[Measurement]]]
                             ) -> None:
        """Replace every point of each (signature, op, signature text, measurements) in one environment,
        all in one transaction: readers see the old points or the new ones, and a failure keeps the old."""
        m = S.measurements
        with self.engine.begin() as conn:
            conn.execute(self._insert_ignore(S.environments, ["key"]).values(key=env.key, fields=env.to_json()))
            for signature, op, signature_text, measurements in replacements:
                conn.execute(self._insert_ignore(S.signatures, ["id"]).values(id=signature, op=op, text=signature_text))
                conn.execute(m.delete().where(m.c.env == env.key, m.c.signature == signature))
                rows = [{"env": env.key, "signature": signature, "point": x.point, "median_us": x.median_us,
                         "p25_us": x.p25_us, "p75_us": x.p75_us, "repeats": x.repeats, "cost_s": x.cost_s,
                         "run_id": None, "created": time.time()} for x in measurements]
                if rows:
                    conn.execute(m.insert(), rows)

    def signatures(self, ids) -> dict[str, tuple[str, str]]:
        """id -> (op, canonical text) of the given signatures the database holds."""
        sg = S.signatures
        with self.engine.connect() as conn:
            rows = conn.execute(select(sg.c.id, sg.c.op, sg.c.text).where(sg.c.id.in_(list(ids)))).all()
        return {i: (op, t) for i, op, t in rows}

    def signature_text(self, signature: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(S.signatures.c.text).where(S.signatures.c.id == signature)).scalar()

    # -- fitted regressors ----------------------------------------------------------------------
    def fit(self, env_key: str, signature: str) -> tuple[str, str] | None:
        """(data hash, model JSON) of the stored fit, if any."""
        f = S.fits
        with self.engine.connect() as conn:
            row = conn.execute(select(f.c.data_hash, f.c.model).where(f.c.env == env_key,
                                                                       f.c.signature == signature)).first()
        return (row[0], row[1]) if row else None

    def put_fit(self, env_key: str, signature: str, data_hash: str, model_json: str) -> None:
        """Cache a fit (a read-only database keeps none: fits are recomputed)."""
        if not self.writable:
            return
        f = S.fits
        with self.engine.begin() as conn:
            conn.execute(f.delete().where(f.c.env == env_key, f.c.signature == signature))
            conn.execute(f.insert().values(env=env_key, signature=signature, data_hash=data_hash, model=model_json))

    # -- runs -----------------------------------------------------------------------------------
    def start_run(self, env_key: str, models: list[str]) -> int:
        with self.engine.begin() as conn:
            res = conn.execute(S.runs.insert().values(env=env_key, models=json.dumps(models), started=time.time(),
                                                      measured=0, reused=0, device_s=0.0, baseline_s=0.0,
                                                      status="running"))
            return int(res.inserted_primary_key[0])

    def update_run(self, run_id: int, **fields) -> None:
        with self.engine.begin() as conn:
            conn.execute(S.runs.update().where(S.runs.c.id == run_id).values(**fields))

    def run_totals(self, run_id: int) -> tuple[int, float]:
        """(points stored under the run, their device-seconds), whichever process stored them."""
        m = S.measurements
        with self.engine.connect() as conn:
            n, cost = conn.execute(select(func.count(), func.sum(m.c.cost_s)).where(m.c.run_id == run_id)).one()
        return int(n), float(cost or 0.0)

    def unfinished_points(self, env_key: str) -> set[tuple[str, str]]:
        """(signature, point) of the measurements stored by runs that did not finish (interrupted,
        killed, incomplete)."""
        m, r = S.measurements, S.runs
        q = (select(m.c.signature, m.c.point).join(r, r.c.id == m.c.run_id)
             .where(m.c.env == env_key, r.c.status != "done"))
        with self.engine.connect() as conn:
            return {(sig, p) for sig, p in conn.execute(q)}

    def runs(self) -> list[dict]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(S.runs).order_by(S.runs.c.id))]

    # -- summaries ------------------------------------------------------------------------------
    def stats(self) -> list[dict]:
        """Per environment: signatures, points, device-seconds stored, runs."""
        m = S.measurements
        with self.engine.connect() as conn:
            rows = conn.execute(select(m.c.env, func.count(func.distinct(m.c.signature)), func.count(),
                                       func.sum(m.c.cost_s)).group_by(m.c.env)).all()
            nruns = dict(conn.execute(select(S.runs.c.env, func.count()).group_by(S.runs.c.env)).all())
        envs = {e.key: e for e in self.environments()}
        return [{"env": k, "environment": envs.get(k), "signatures": s, "points": p, "device_s": c or 0.0,
                 "runs": nruns.get(k, 0)} for k, s, p, c in rows]

    def listing(self, env_key: str | None = None) -> list[dict]:
        """Per (environment, signature): op, number of points, median range."""
        m, sg = S.measurements, S.signatures
        q = (select(m.c.env, m.c.signature, sg.c.op, func.count(), func.min(m.c.median_us), func.max(m.c.median_us))
             .join(sg, sg.c.id == m.c.signature).group_by(m.c.env, m.c.signature, sg.c.op)
             .order_by(m.c.env, sg.c.op))
        if env_key:
            q = q.where(m.c.env == env_key)
        with self.engine.connect() as conn:
            return [{"env": e, "signature": s, "op": op, "points": n, "min_us": lo, "max_us": hi}
                    for e, s, op, n, lo, hi in conn.execute(q)]
