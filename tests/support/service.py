"""What tests of the service share: the bundled data's features and a realistic row, the tokens the test app is
started with, CSV and metric helpers, fresh ground truth for retrains."""

from __future__ import annotations

import csv
import functools
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sklearn.datasets import load_diabetes

if TYPE_CHECKING:
    from app.predlog import PredictionBatch

FEATURES = tuple(load_diabetes().feature_names)
ADMIN_TOKEN = "test-admin-token-0123456789"
INGEST_TOKEN = "test-ingest-token-0123456789"


@functools.cache
def _first_row() -> tuple[float, ...]:
    return tuple(load_diabetes().data[0].tolist())


def record(**overrides: float) -> dict[str, float]:
    """A realistic input row: the bundled data's first row (read once: tests build thousands of rows)."""
    row = dict(zip(FEATURES, _first_row(), strict=True))
    row.update(overrides)
    return row


def admin_headers(token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ingest_headers(token: str = INGEST_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def write_csv(path: Path, rows: list[int]) -> Path:
    """A CSV dataset made of the given rows of the bundled data (so tests can hold fresh rows back)."""
    data = load_diabetes()
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*FEATURES, "target"])
        for index in rows:
            writer.writerow([*data.data[index].tolist(), float(data.target[index])])
    return path


def logged_rows(count: int, first_ts: float, features: list[float], id_prefix: str = "") -> PredictionBatch:
    """``count`` answered rows for a prediction log, one second apart from ``first_ts``, ids in time order."""
    from app.predlog import PredictionBatch

    return PredictionBatch(
        [f"{id_prefix}{i:08d}" for i in range(count)],
        first_ts + np.arange(count, dtype=float),
        "v0001",
        np.tile(np.asarray(features, dtype=float), (count, 1)),
        np.ones(count),
        np.full(count, 0.5),
        np.full(count, 1.5),
        0.9,
        np.zeros(count, dtype=bool),
        1.0,
    )


def metric_value(exposition: str, sample_name: str, **labels: str) -> float | None:
    """One sample's value from a Prometheus text exposition, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


BASE_ROWS = list(range(0, 120))  # the service starts from these; the rest of the bundled data arrives later
FRESH_ROWS = list(range(120, 442))


def fresh_observations(rows: list[int], target_noise: float = 0.0, seed: int = 0) -> list[dict]:
    data = load_diabetes()
    rng = np.random.default_rng(seed)
    return [
        {
            "features": dict(zip(FEATURES, data.data[i].tolist(), strict=True)),
            "target": float(data.target[i] + rng.normal(0, target_noise)) if target_noise else float(data.target[i]),
        }
        for i in rows
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def served_app(settings: object, port: int | None = None) -> Iterator[str]:
    """The app for ``settings`` served by uvicorn on 127.0.0.1 in a thread, for clients that speak HTTP themselves
    (tritonclient); yields ``host:port``. ``port``: one chosen beforehand (a free one if None)."""
    import uvicorn

    from app.main import create_app

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "the service did not start"
        time.sleep(0.05)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
