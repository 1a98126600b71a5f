"""The prediction log and observations in PostgreSQL: one store for replicas on every node of the swarm.

SQLite stays the single-node default (a file on the data volume); a SQLite file shared over a network filesystem
is not an option (its locks are not safe there), so with worker nodes every replica writes here instead.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import psycopg
import psycopg.sql
from psycopg import errors as pg_errors

from app.predlog import PredictionLog

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id TEXT PRIMARY KEY,
    ts DOUBLE PRECISION NOT NULL,
    model_version TEXT NOT NULL,
    features DOUBLE PRECISION[] NOT NULL,
    prediction DOUBLE PRECISION NOT NULL,
    lower DOUBLE PRECISION NOT NULL,
    upper DOUBLE PRECISION NOT NULL,
    confidence DOUBLE PRECISION NOT NULL,
    ood INTEGER NOT NULL,
    latency_ms DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts);
CREATE TABLE IF NOT EXISTS observations (
    rowid BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts DOUBLE PRECISION NOT NULL,
    prediction_id TEXT,
    features DOUBLE PRECISION[] NOT NULL,
    target DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS observations_prediction ON observations (prediction_id);
"""
# Replicas starting together would race on CREATE TABLE IF NOT EXISTS (a unique violation in pg_type): one at a
# time, under a transaction-scoped advisory lock (the number is arbitrary and only ours).
SCHEMA_LOCK = 0x6D6C617069


def wait_for_database(conninfo: str, timeout_s: float) -> None:
    """At start-up the database may still be starting (a fresh deploy, a restart): retry, then give up saying why."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with psycopg.connect(conninfo, connect_timeout=5) as connection:
                connection.execute("SELECT 1")
            return
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL is unreachable after {timeout_s:g} s: {exc}") from exc
            time.sleep(1)


def namespace_of(store: str) -> str | None:
    """The PostgreSQL schema (namespace) of a model project's store, so each project and schema keeps its own
    tables in the one database: ``projects/penguins-58ef80a0dfaa`` -> ``mlapi_penguins_58ef80a0dfaa``. None: the
    tables of the data from before projects, in the default namespace."""
    if not store:
        return None
    key = store.removeprefix("projects/")
    name, _, digest = key.rpartition("-")
    safe = "".join(c if c.isalnum() else "_" for c in name.lower())[:40]
    return f"mlapi_{safe}_{digest}"


def connect(
    conninfo: str, timeout_s: int, schema: str, schema_lock: int, namespace: str | None = None
) -> psycopg.Connection:
    """A connection with ``schema`` in place (in ``namespace`` if given). Autocommit: reads hold no transaction open
    between requests; writes use explicit transactions. Replicas starting together create the schema one at a time
    (``schema_lock``)."""
    connection = psycopg.connect(conninfo, autocommit=True, connect_timeout=timeout_s, application_name="mlapi")
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (schema_lock,))
        if namespace is not None:
            name = psycopg.sql.Identifier(namespace)
            connection.execute(psycopg.sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(name))
            connection.execute(psycopg.sql.SQL("SET search_path TO {}").format(name))
        connection.execute(schema)
    return connection


class PostgresLog(PredictionLog):
    """``conninfo``: a libpq URL or key=value string (postgresql://mlapi@mlapi-postgres:5432/mlapi)."""

    no_limit = None  # LIMIT NULL: all rows
    errors = (psycopg.Error,)

    def __init__(
        self, conninfo: str, queue_bytes: int, connect_timeout_s: int = 5, namespace: str | None = None, **options: Any
    ) -> None:
        super().__init__(queue_bytes, **options)
        self._conninfo = conninfo
        self._connect_timeout_s = connect_timeout_s
        self._namespace = namespace

    def connect(self) -> psycopg.Connection:
        return connect(self._conninfo, self._connect_timeout_s, SCHEMA, SCHEMA_LOCK, self._namespace)

    def _transaction(self, connection: psycopg.Connection) -> contextlib.AbstractContextManager:
        return connection.transaction()

    def _sql(self, query: str) -> str:
        return query.replace("?", "%s")

    def _usable(self, connection: psycopg.Connection | None) -> bool:
        return connection is not None and not connection.closed and not connection.broken

    def _full(self, exc: Exception) -> bool:
        return isinstance(exc, pg_errors.DiskFull)

    def encode_features(self, features: list[float]) -> list[float]:
        return [float(value) for value in features]

    def decode_features(self, stored: list[float]) -> list[float]:
        return stored
