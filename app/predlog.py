"""Prediction log and observations in SQLite (WAL) on the data directory.

Predictions are queued and written by one background thread: a slow or full disk costs log records (counted as
dropped), never a prediction. Observations are ground truth that retraining consumes, so they are written
synchronously and the caller learns whether they were stored.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    model_version TEXT NOT NULL,
    features TEXT NOT NULL,
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
    features TEXT NOT NULL,
    target REAL NOT NULL
);
"""


class StorageFull(RuntimeError):
    """The data volume is below its free-space floor: ground truth is refused rather than filling the disk."""


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


def connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=5, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.executescript(SCHEMA)
    return connection


class PredictionLog:
    def __init__(
        self,
        path: Path,
        queue_size: int,
        on_drop: Callable[[int], None] = lambda n: None,
        retention: Retention = Retention(),
    ) -> None:
        self.path = path
        self.retention = retention
        self._pruned_at = 0.0
        self._queue: queue.Queue[PredictionRecord | None] = queue.Queue(maxsize=queue_size)
        self._on_drop = on_drop
        self._observations_lock = threading.Lock()
        self._observations = connect(path)
        self._writer = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._writer.start()

    # -- predictions --------------------------------------------------------------------------------------------
    def record(self, records: list[PredictionRecord]) -> None:
        """Queue records without ever blocking; a full queue drops them and says how many."""
        for index, record in enumerate(records):
            try:
                self._queue.put_nowait(record)
            except queue.Full:
                self._on_drop(len(records) - index)
                return

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued record has been written or dropped (used by tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return self._queue.unfinished_tasks == 0

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._writer.join(timeout=5)
        self._observations.close()

    def _run(self) -> None:
        connection: sqlite3.Connection | None = None
        while True:
            first = self._queue.get()
            if first is None:
                self._queue.task_done()
                break
            batch = [first]
            while len(batch) < 500:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # keep the stop signal for the outer loop
                    self._queue.task_done()
                    break
                batch.append(item)
            try:
                if not self.has_room():
                    raise sqlite3.OperationalError(
                        f"below the free-space floor ({self.retention.min_free_bytes // 2**20} MiB free kept)"
                    )
                connection = connection or connect(self.path)
                if time.monotonic() - self._pruned_at > self.retention.prune_every_s:
                    self.prune(connection)
                with connection:
                    connection.executemany(
                        "INSERT OR IGNORE INTO predictions VALUES (?,?,?,?,?,?,?,?,?,?)",
                        [
                            (
                                r.id,
                                r.ts,
                                r.model_version,
                                json.dumps(r.features),
                                r.prediction,
                                r.lower,
                                r.upper,
                                r.confidence,
                                int(r.ood),
                                r.latency_ms,
                            )
                            for r in batch
                        ],
                    )
            except sqlite3.Error as exc:  # disk full, read-only, locked: logging degrades, serving goes on
                log.warning("prediction log: dropped %d records: %s", len(batch), exc)
                self._on_drop(len(batch))
                connection = None
            finally:
                for _ in batch:
                    self._queue.task_done()
        if connection is not None:
            connection.close()

    def has_room(self) -> bool:
        return shutil.disk_usage(self.path.parent).free >= self.retention.min_free_bytes

    def prune(self, connection: sqlite3.Connection | None = None, now: float | None = None) -> int:
        """Delete predictions older than the retention or beyond the row cap (the oldest first); how many went."""
        self._pruned_at = time.monotonic()
        now = time.time() if now is None else now
        # The writer thread prunes on its own connection; anyone else uses the shared one, under its lock.
        lock = self._observations_lock if connection is None else contextlib.nullcontext()
        connection = connection or self._observations
        with lock, connection:
            aged = connection.execute("DELETE FROM predictions WHERE ts < ?", (now - self.retention.max_age_s,))
            capped = connection.execute(
                "DELETE FROM predictions WHERE ts <= (SELECT ts FROM predictions ORDER BY ts DESC LIMIT 1 OFFSET ?)",
                (self.retention.max_rows,),
            )
        return aged.rowcount + capped.rowcount

    def recent_features(self, limit: int) -> np.ndarray:
        with self._observations_lock:
            rows = self._observations.execute(
                "SELECT features FROM predictions ORDER BY ts DESC LIMIT ?", (limit,)
            ).fetchall()
        return np.array([json.loads(row[0]) for row in rows], dtype=np.float64)

    def count_predictions(self) -> int:
        with self._observations_lock:
            return self._observations.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]

    def prediction_features(self, prediction_ids: list[str]) -> dict[str, list[float]]:
        if not prediction_ids:
            return {}
        marks = ",".join("?" * len(prediction_ids))
        with self._observations_lock:
            rows = self._observations.execute(
                f"SELECT id, features FROM predictions WHERE id IN ({marks})",  # noqa: S608 (only "?" marks)
                prediction_ids,
            ).fetchall()
        return {row[0]: json.loads(row[1]) for row in rows}

    # -- observations -------------------------------------------------------------------------------------------
    def add_observations(self, rows: list[tuple[str | None, list[float], float]]) -> int:
        if not self.has_room():
            raise StorageFull(
                f"the data volume has less than {self.retention.min_free_bytes // 2**20} MiB free: "
                "observations are not stored until space is freed"
            )
        now = time.time()
        with self._observations_lock, self._observations:
            self._observations.executemany(
                "INSERT INTO observations (ts, prediction_id, features, target) VALUES (?,?,?,?)",
                [(now, pid, json.dumps(features), target) for pid, features, target in rows],
            )
        return len(rows)

    def observations(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The stored observations, oldest first; with ``limit``, only the newest ``limit`` of them."""
        with self._observations_lock:
            rows = self._observations.execute(
                "SELECT features, target FROM (SELECT rowid, features, target FROM observations "
                "ORDER BY rowid DESC LIMIT ?) ORDER BY rowid",
                (-1 if limit is None else limit,),
            ).fetchall()
        if not rows:
            return np.empty((0, 0)), np.empty(0)
        X = np.array([json.loads(row[0]) for row in rows], dtype=np.float64)
        return X, np.array([row[1] for row in rows], dtype=np.float64)
