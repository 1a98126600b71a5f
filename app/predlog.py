"""Prediction log and observations: SQLite (WAL) on the data directory on one node, PostgreSQL (app/pglog.py) when
replicas run on several nodes. Both are a ``PredictionLog``: the service sees one interface.

Predictions are queued and written by one background thread: a slow or full disk, or a database that is away for a
moment, costs log records (counted as dropped), never a prediction. Observations are ground truth that retraining
consumes, so they are written synchronously and the caller learns whether they were stored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import shutil
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    model_version TEXT NOT NULL,
    features BLOB NOT NULL,
    prediction REAL NOT NULL,
    lower REAL NOT NULL,
    upper REAL NOT NULL,
    confidence REAL NOT NULL,
    ood INTEGER NOT NULL,
    latency_ms REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts);
CREATE TABLE IF NOT EXISTS observations (
    rowid INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    prediction_id TEXT,
    features BLOB NOT NULL,
    target REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS observations_prediction ON observations (prediction_id);
"""


class StorageFull(RuntimeError):
    """The data volume is below its free-space floor: ground truth is refused rather than filling the disk."""


class StoreUnavailable(RuntimeError):
    """The log store cannot be reached (the database is restarting or away): nothing was stored."""


@dataclass(frozen=True)
class Retention:
    """How much of the prediction log is kept, and how much of the volume must stay free (for model saves and
    Traefik's certificate renewals, which live on the same volume)."""

    max_age_s: float = 90 * 86400
    max_rows: int = 2_000_000
    min_free_bytes: int = 256 * 1024 * 1024
    prune_every_s: float = 60.0


@dataclass(frozen=True)
class PredictionRecord:
    id: str
    ts: float
    model_version: str
    features: list[float]
    prediction: float
    lower: float
    upper: float
    confidence: float
    ood: bool
    latency_ms: float


@dataclass(frozen=True)
class PredictionBatch:
    """One call's answered rows as arrays, queued as one item: the writer thread turns them into rows, off the
    request path (10,000 record objects cost a 10,000-row call 20 ms; see docs/benchmarks.md)."""

    ids: list[str]
    ts: np.ndarray  # [N] unix time
    model_version: str
    features: np.ndarray  # [N, F] float64, NaN for a gap
    prediction: np.ndarray  # [N]
    lower: np.ndarray
    upper: np.ndarray
    confidence: float
    ood: np.ndarray  # [N] bool
    latency_ms: float

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """About what the batch holds in memory while queued: its arrays, its ids, the objects around them."""
        return self.features.nbytes + len(self.ids) * (5 * 8 + 90) + 1000

    def rows(self, encoded_features: list[Any]) -> Iterator[tuple]:
        """The rows to insert, in INSERT_PREDICTIONS's column order."""
        count = len(self.ids)
        return zip(
            self.ids,
            self.ts.tolist(),
            repeat(self.model_version, count),
            encoded_features,
            self.prediction.tolist(),
            self.lower.tolist(),
            self.upper.tolist(),
            repeat(self.confidence, count),
            self.ood.astype(int).tolist(),
            repeat(self.latency_ms, count),
            strict=True,
        )


@dataclass(frozen=True)
class LoggedPrediction(PredictionRecord):
    observed: float | None  # the newest ground truth posted for this prediction, if any


INSERT_PREDICTIONS = "INSERT INTO predictions VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"
INSERT_OBSERVATIONS = "INSERT INTO observations (ts, prediction_id, features, target) VALUES (?,?,?,?)"
# Retention deletes in chunks, the oldest first: one pass over millions of rows held the writer for seconds, and the
# calls waiting on its queue dropped their log (measured in bench_peer). The writer deletes a chunk a pass.
PRUNE_CHUNK = 20_000
PRUNE_AGED = "DELETE FROM predictions WHERE id IN (SELECT id FROM predictions WHERE ts < ? ORDER BY ts LIMIT ?)"
PRUNE_CAPPED = "DELETE FROM predictions WHERE id IN (SELECT id FROM predictions WHERE ts <= ? ORDER BY ts LIMIT ?)"
CAP_TS = "SELECT ts FROM predictions ORDER BY ts DESC LIMIT 1 OFFSET ?"  # the newest time beyond the row cap
RECENT_FEATURES = "SELECT features FROM predictions ORDER BY ts DESC LIMIT ?"
# A page of the log after (ts, id), with the newest observation of each prediction: keyset pages keep both the
# replica's memory and the lock on the shared connection bounded however long the export runs.
EXPORT_PAGE = (
    "SELECT p.id, p.ts, p.model_version, p.features, p.prediction, p.lower, p.upper, p.confidence, p.ood, "
    "p.latency_ms, (SELECT o.target FROM observations o WHERE o.prediction_id = p.id "
    "ORDER BY o.rowid DESC LIMIT 1) FROM predictions p "
    "WHERE p.ts > ? OR (p.ts = ? AND p.id > ?) ORDER BY p.ts, p.id LIMIT ?"
)
NEWEST_OBSERVATIONS = (
    "SELECT features, target FROM (SELECT rowid, features, target FROM observations "
    "ORDER BY rowid DESC LIMIT ?) AS newest ORDER BY rowid"
)


class PredictionLog(ABC):
    """The queue, its writer thread, retention and the queries; a subclass says how to connect and store features.

    Queries are written once with ``?`` marks; a backend with another paramstyle translates them (``_sql``)."""

    no_limit: int | None = None  # the LIMIT value meaning "all rows"
    errors: tuple[type[Exception], ...] = ()  # what a failed statement raises

    def __init__(
        self,
        queue_bytes: int,
        on_drop: Callable[[int], None] = lambda n: None,
        retention: Retention = Retention(),
    ) -> None:
        self.retention = retention
        self._pruned_at = 0.0
        # Each call's rows travel as one item (a 10,000-row batch: one put, not 10,000); the bound is in bytes.
        self._queue: queue.Queue[PredictionBatch | None] = queue.Queue()
        self._capacity = queue_bytes
        self._queued = 0  # bytes waiting, under _room
        self._room = threading.Condition()  # notified when the writer has taken rows off the queue
        self._on_drop = on_drop
        self._shared_lock = threading.Lock()
        self._shared_connection: Any = None
        self._writer = threading.Thread(target=self._run, name="prediction-log", daemon=True)

    def start(self) -> PredictionLog:
        """Create the schema (or fail with the reason) and start the writer."""
        with self._shared():
            pass
        self._writer.start()
        return self

    # -- what a backend provides --------------------------------------------------------------------------------
    @abstractmethod
    def connect(self) -> Any:
        """A new connection with the schema in place."""

    @abstractmethod
    def _transaction(self, connection: Any) -> contextlib.AbstractContextManager:
        """Commits on success, rolls back on error."""

    @abstractmethod
    def encode_features(self, features: list[float]) -> Any: ...

    def encode_matrix(self, features: np.ndarray) -> list[Any]:
        """Each row of an [N, F] matrix as the store keeps it."""
        return [self.encode_features(row) for row in features.tolist()]

    @abstractmethod
    def decode_features(self, stored: Any) -> list[float]: ...

    def has_room(self) -> bool:
        return True

    def _sql(self, query: str) -> str:
        return query

    def _usable(self, connection: Any) -> bool:
        return connection is not None

    def _full(self, exc: Exception) -> bool:
        """The statement failed because the store's disk is full."""
        return False

    # -- the shared connection (readers and observations), reopened after a failure ----------------------------
    @contextlib.contextmanager
    def _shared(self) -> Iterator[Any]:
        with self._shared_lock:
            if not self._usable(self._shared_connection):
                try:
                    self._shared_connection = self.connect()
                except self.errors as exc:
                    raise StoreUnavailable(f"the prediction log store is unreachable: {exc}") from exc
            try:
                yield self._shared_connection
            except self.errors:
                self._drop_shared()
                raise

    def _drop_shared(self) -> None:
        with contextlib.suppress(Exception):
            self._shared_connection.close()
        self._shared_connection = None

    def _query(self, query: str, parameters: tuple | list = ()) -> list[tuple]:
        try:
            with self._shared() as connection:
                return connection.execute(self._sql(query), parameters).fetchall()
        except self.errors as exc:
            raise StoreUnavailable(f"the prediction log store failed: {exc}") from exc

    # -- predictions --------------------------------------------------------------------------------------------
    def record(self, batch: PredictionBatch, wait_s: float = 0.0) -> None:
        """Queue a call's rows; a call that does not fit within ``wait_s`` drops, and says how many rows. The queue is
        bounded in memory (one call always fits in an empty queue). Single rows on the event loop never wait; a batch
        on a worker thread waits a bounded time, so a steady stream of batches runs at the writer's pace instead of
        losing most of its log (measured: 86 % of 10,000-row batches dropped without)."""
        size = batch.nbytes
        with self._room:

            def fits() -> bool:
                return self._queued == 0 or self._queued + size <= self._capacity

            if wait_s > 0:
                self._room.wait_for(fits, timeout=wait_s)
            taken = fits()
            if taken:
                self._queued += size
        if taken:
            self._queue.put_nowait(batch)
        else:
            self._on_drop(len(batch))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued record has been written or dropped (used by tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return self._queue.unfinished_tasks == 0

    def close(self) -> None:
        if self._writer.is_alive():
            self.flush()
            self._queue.put(None)
            self._writer.join(timeout=5)
        with self._shared_lock:
            if self._shared_connection is not None:
                self._drop_shared()

    def _next_batch(self) -> list[PredictionBatch] | None:
        """The next few queued calls (at least 500 rows when that many wait), written in one transaction."""
        first = self._queue.get()
        if first is None:
            self._queue.task_done()
            return None
        calls, rows = [first], len(first)
        while rows < 500:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # keep the stop signal for the outer loop
                self._queue.task_done()
                break
            calls.append(item)
            rows += len(item)
        return calls

    def _run(self) -> None:
        connection: Any = None
        while (calls := self._next_batch()) is not None:
            rows, size = sum(len(call) for call in calls), sum(call.nbytes for call in calls)
            try:
                if not self.has_room():
                    raise StorageFull(
                        f"below the free-space floor ({self.retention.min_free_bytes // 2**20} MiB free kept)"
                    )
                connection = connection if self._usable(connection) else self.connect()
                due = time.monotonic() - self._pruned_at > self.retention.prune_every_s
                if due and self.prune(connection, max_chunks=1) >= PRUNE_CHUNK:
                    self._pruned_at = 0.0  # more to delete: another chunk after the next write
                with self._transaction(connection):
                    cursor = connection.cursor()
                    for call in calls:
                        cursor.executemany(self._sql(INSERT_PREDICTIONS), call.rows(self.encode_matrix(call.features)))
            except (StorageFull, *self.errors) as exc:  # disk full, read-only, locked, away: logging degrades
                log.warning("prediction log: dropped %d records: %s", rows, exc)
                self._on_drop(rows)
                with contextlib.suppress(Exception):
                    connection.close()
                connection = None
            finally:
                with self._room:
                    self._queued -= size
                    self._room.notify_all()
                for _ in calls:
                    self._queue.task_done()
        if connection is not None:
            connection.close()

    def prune(self, connection: Any = None, now: float | None = None, max_chunks: int | None = None) -> int:
        """Delete predictions older than the retention, then beyond the row cap, the oldest first: for each, at most
        ``max_chunks`` chunks of PRUNE_CHUNK rows (all when None), each chunk its own transaction. How many went."""
        self._pruned_at = time.monotonic()
        now = time.time() if now is None else now
        # The writer thread prunes on its own connection; anyone else uses the shared one, under its lock.
        owner = contextlib.nullcontext(connection) if connection is not None else self._shared()
        deleted = 0
        with owner as used:
            capped = used.execute(self._sql(CAP_TS), (self.retention.max_rows,)).fetchone()
            for query, bound in ((PRUNE_AGED, now - self.retention.max_age_s), (PRUNE_CAPPED, capped and capped[0])):
                chunks = 0
                while bound is not None and (max_chunks is None or chunks < max_chunks):
                    with self._transaction(used):
                        went = used.execute(self._sql(query), (bound, PRUNE_CHUNK)).rowcount
                    deleted, chunks = deleted + went, chunks + 1
                    if went < PRUNE_CHUNK:
                        break
        return deleted

    def recent_features(self, limit: int) -> np.ndarray:
        rows = self._query(RECENT_FEATURES, (limit,))
        return np.array([self.decode_features(row[0]) for row in rows], dtype=np.float64)

    def count_predictions(self) -> int:
        return self._query("SELECT COUNT(*) FROM predictions")[0][0]

    def export(self, since: float, page: int = 2000) -> Iterator[LoggedPrediction]:
        """Every logged prediction from ``since`` (unix time) on, oldest first, with the newest observation that
        arrived for it; read a page at a time."""
        ts, last_id = since, ""
        while True:
            rows = self._query(EXPORT_PAGE, (ts, ts, last_id, page))
            for row in rows:
                yield LoggedPrediction(*row[:3], self.decode_features(row[3]), *row[4:8], bool(row[8]), *row[9:])
            if len(rows) < page:
                return
            ts, last_id = rows[-1][1], rows[-1][0]

    def prediction_features(self, prediction_ids: list[str]) -> dict[str, list[float]]:
        if not prediction_ids:
            return {}
        marks = ",".join("?" * len(prediction_ids))
        rows = self._query(f"SELECT id, features FROM predictions WHERE id IN ({marks})", prediction_ids)  # noqa: S608 (only "?" marks)
        return {row[0]: self.decode_features(row[1]) for row in rows}

    # -- observations -------------------------------------------------------------------------------------------
    def add_observations(self, rows: list[tuple[str | None, list[float], float]]) -> int:
        if not self.has_room():
            raise StorageFull(
                f"the data volume has less than {self.retention.min_free_bytes // 2**20} MiB free: "
                "observations are not stored until space is freed"
            )
        now = time.time()
        try:
            with self._shared() as connection, self._transaction(connection):
                connection.cursor().executemany(
                    self._sql(INSERT_OBSERVATIONS),
                    [(now, pid, self.encode_features(features), target) for pid, features, target in rows],
                )
        except self.errors as exc:
            if self._full(exc):
                raise StorageFull(f"the log store's disk is full: nothing was stored ({exc})") from exc
            raise StoreUnavailable(f"the log store failed, nothing was stored: {exc}") from exc
        return len(rows)

    def observations(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The stored observations, oldest first; with ``limit``, only the newest ``limit`` of them."""
        rows = self._query(NEWEST_OBSERVATIONS, (self.no_limit if limit is None else limit,))
        if not rows:
            return np.empty((0, 0)), np.empty(0)
        X = np.array([self.decode_features(row[0]) for row in rows], dtype=np.float64)
        return X, np.array([row[1] for row in rows], dtype=np.float64)


SQLITE_BUSY_S = 5


def connect_sqlite(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=SQLITE_BUSY_S, check_same_thread=False)
    # Replicas starting together on a new file race to switch it to WAL, and SQLite answers that switch with "locked"
    # at once instead of waiting out its busy timeout: wait that long here.
    deadline = time.monotonic() + SQLITE_BUSY_S
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                connection.close()
                raise
            time.sleep(0.05)
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.executescript(SQLITE_SCHEMA)
    return connection


class SqliteLog(PredictionLog):
    """One file on the data volume, shared by the replicas of one node (WAL: readers never wait for the writer)."""

    no_limit = -1
    errors = (sqlite3.Error,)

    def __init__(self, path: Path, queue_bytes: int, **options: Any) -> None:
        super().__init__(queue_bytes, **options)
        self.path = path

    def connect(self) -> sqlite3.Connection:
        return connect_sqlite(self.path)

    def _transaction(self, connection: sqlite3.Connection) -> contextlib.AbstractContextManager:
        return connection  # sqlite3's connection commits or rolls back as a context manager

    # Features are stored as little-endian float64 bytes (a row of F features: 8 F bytes, NaN for a gap): a 10,000-row
    # batch encodes in 3 ms, against 50-70 ms as JSON text. Logs written before kept JSON text; both are read.
    def encode_features(self, features: list[float]) -> bytes:
        return np.asarray(features, dtype="<f8").tobytes()

    def encode_matrix(self, features: np.ndarray) -> list[bytes]:
        raw, width = np.ascontiguousarray(features, dtype="<f8").tobytes(), 8 * features.shape[1]
        return [raw[start : start + width] for start in range(0, len(raw), width)]

    def decode_features(self, stored: bytes | str) -> list[float]:
        if isinstance(stored, str):
            return json.loads(stored)
        return np.frombuffer(stored, dtype="<f8").tolist()

    def has_room(self) -> bool:
        return shutil.disk_usage(self.path.parent).free >= self.retention.min_free_bytes
