"""The model registry in PostgreSQL: one registry for replicas on every node of the swarm.

The same interface as the file registry (app/registry.py): versions (skops bytes + metadata, verified the same way
on load), the current pointer, the fixed holdout and its seed, the retrain history, and the one-writer lock, here a
PostgreSQL advisory lock held by a connection of its own. Every replica's watcher reads the pointer (one indexed row)
every couple of seconds, so a promotion made by any replica reaches every node within seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Iterator

import psycopg
import skops.io as sio
from psycopg import errors as pg_errors

from app.data import Dataset
from app.model import ModelMetadata, Predictor
from app.pglog import connect
from app.registry import (
    VERSION_PATTERN,
    Registry,
    RegistryError,
    RetrainBusy,
    holdout_from_bytes,
    holdout_to_bytes,
    load_verified,
    new_seed,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS model_versions (
    number INTEGER PRIMARY KEY,
    metadata TEXT NOT NULL,
    model BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS registry_state (
    key TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS retrain_history (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    record TEXT NOT NULL
);
"""
SCHEMA_LOCK = 0x6D6C617068  # creating the tables, one replica at a time
WRITER_LOCK = 0x6D6C617072  # one writer of the registry (retrain, rollback, seeding) across the swarm


def _number(version: str) -> int:
    match = VERSION_PATTERN.match(version)
    if not match:
        raise RegistryError(f"version must look like v0001, got {version!r}")
    return int(match.group(1))


def _name(number: int) -> str:
    return f"v{number:04d}"


class SharedRegistry:
    """``conninfo``: the same PostgreSQL URL as the prediction log's."""

    def __init__(
        self,
        conninfo: str,
        connect_timeout_s: int = 5,
        namespace: str | None = None,
        trusted: frozenset[str] = frozenset(),
    ) -> None:
        self.trusted = trusted  # the project's own types (model.trusted_types), beside TRUSTED_TYPES
        self._conninfo = conninfo
        self._connect_timeout_s = connect_timeout_s
        self._namespace = namespace
        self._lock = threading.Lock()
        self._connection: psycopg.Connection | None = None

    # -- connections -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _use(self) -> Iterator[psycopg.Connection]:
        """The shared connection, reopened after a failure (a database restart)."""
        with self._lock:
            if self._connection is None or self._connection.closed or self._connection.broken:
                self._connection = connect(
                    self._conninfo, self._connect_timeout_s, SCHEMA, SCHEMA_LOCK, self._namespace
                )
            try:
                yield self._connection
            except psycopg.OperationalError:
                with contextlib.suppress(Exception):
                    self._connection.close()
                self._connection = None
                raise

    def _rows(self, query: str, parameters: tuple = ()) -> list[tuple]:
        with self._use() as connection:
            return connection.execute(query, parameters).fetchall()

    def _state(self, key: str) -> bytes | None:
        rows = self._rows("SELECT value FROM registry_state WHERE key = %s", (key,))
        return bytes(rows[0][0]) if rows else None

    def _set_state(self, key: str, value: bytes, *, keep_existing: bool = False) -> None:
        conflict = "DO NOTHING" if keep_existing else "DO UPDATE SET value = EXCLUDED.value"
        with self._use() as connection:
            connection.execute(
                f"INSERT INTO registry_state (key, value) VALUES (%s, %s) ON CONFLICT (key) {conflict}",  # noqa: S608 (a fixed clause)
                (key, value),
            )

    @contextlib.contextmanager
    def lock(self, *, blocking: bool) -> Iterator[None]:
        """One writer across every replica on every node: a session advisory lock on a connection of its own (a
        replica that dies releases it with its connection). Non-blocking callers get RetrainBusy."""
        with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=self._connect_timeout_s) as connection:
            if blocking:
                connection.execute("SELECT pg_advisory_lock(%s)", (WRITER_LOCK,))
            elif not connection.execute("SELECT pg_try_advisory_lock(%s)", (WRITER_LOCK,)).fetchone()[0]:
                raise RetrainBusy("a retrain or rollback is already running (in this or another replica)")
            try:
                yield
            finally:
                connection.execute("SELECT pg_advisory_unlock(%s)", (WRITER_LOCK,))

    # -- versions ----------------------------------------------------------------------------------------------
    def version_names(self) -> list[str]:
        return [_name(row[0]) for row in self._rows("SELECT number FROM model_versions ORDER BY number")]

    def metadata(self, version: str) -> ModelMetadata:
        rows = self._rows("SELECT metadata FROM model_versions WHERE number = %s", (_number(version),))
        if not rows:
            raise RegistryError(f"version {version} does not exist (known: {self.version_names()})")
        try:
            return ModelMetadata.model_validate_json(rows[0][0])
        except ValueError as exc:
            raise RegistryError(f"version {version}: unreadable metadata ({exc})") from exc

    def list(self) -> list[ModelMetadata]:
        rows = self._rows("SELECT metadata FROM model_versions ORDER BY number")
        return [ModelMetadata.model_validate_json(row[0]) for row in rows]

    def _insert(self, metadata: ModelMetadata, blob: bytes) -> None:
        with self._use() as connection:
            connection.execute(
                "INSERT INTO model_versions (number, metadata, model) VALUES (%s, %s, %s)",
                (_number(metadata.version), metadata.model_dump_json(indent=2), blob),
            )

    def save(self, predictor: Predictor, parent: str | None) -> str:
        """Store a new version and return its name; it is not made current here."""
        blob = sio.dumps(predictor.conformal)
        while True:
            rows = self._rows("SELECT COALESCE(MAX(number), 0) + 1 FROM model_versions")
            version = _name(rows[0][0])
            metadata = predictor.metadata.model_copy(
                update={"version": version, "parent": parent, "sha256": hashlib.sha256(blob).hexdigest()}
            )
            try:
                self._insert(metadata, blob)
            except pg_errors.UniqueViolation:
                continue  # another writer took the number
            predictor.metadata = metadata
            return version

    def load(self, version: str) -> Predictor:
        metadata = self.metadata(version)
        rows = self._rows("SELECT model FROM model_versions WHERE number = %s", (_number(version),))
        return load_verified(version, metadata, bytes(rows[0][0]), self.trusted)

    # -- current pointer ---------------------------------------------------------------------------------------
    def current(self) -> str | None:
        value = self._state("current")
        return value.decode() if value else None

    def set_current(self, version: str) -> None:
        self.metadata(version)  # exists
        self._set_state("current", version.encode())

    # -- holdout, its seed, history ----------------------------------------------------------------------------
    def holdout_seed(self) -> int:
        self._set_state("holdout_seed", new_seed().encode(), keep_existing=True)  # the first one made stays
        return int(self._state("holdout_seed").decode())

    def known_holdout_seed(self) -> int | None:
        stored = self._state("holdout_seed")
        return None if stored is None else int(stored.decode())

    def load_holdout(self, like: Dataset) -> Dataset | None:
        stored = self._state("holdout")
        return None if stored is None else holdout_from_bytes(stored, like, "the shared registry's holdout")

    def save_holdout(self, holdout: Dataset) -> None:
        self._set_state("holdout", holdout_to_bytes(holdout))

    def append_history(self, record: dict) -> None:
        with self._use() as connection:
            connection.execute(
                "INSERT INTO retrain_history (record) VALUES (%s)", (json.dumps(record, sort_keys=True),)
            )

    def history(self, limit: int) -> list[dict]:
        rows = self._rows(
            "SELECT record FROM (SELECT id, record FROM retrain_history ORDER BY id DESC LIMIT %s) AS newest "
            "ORDER BY id",
            (limit,),
        )
        return [json.loads(row[0]) for row in rows]

    # -- growing from one node ---------------------------------------------------------------------------------
    def import_from(self, local: Registry) -> int:
        """Copy a file registry in, byte for byte (the sha256 in each metadata still holds); the caller holds the
        writer lock and has seen that this registry has no current version."""
        names = local.version_names()
        for name in names:
            if not self._rows("SELECT 1 FROM model_versions WHERE number = %s", (_number(name),)):
                self._insert(local.metadata(name), local.model_bytes(name))
        holdout = local.holdout_bytes()
        if holdout is not None:
            self._set_state("holdout", holdout)
        if local.seed_path.exists():
            self._set_state("holdout_seed", local.seed_path.read_text().strip().encode())
        for record in local.history(limit=1_000_000):
            self.append_history(record)
        self.set_current(local.current())
        return len(names)

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
