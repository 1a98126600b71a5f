"""What the alert rules read from a replica (infra/spec/monitoring.py): drift per feature on a schedule, retrains failed
in a row from the shared history, the data volume's room and the container's memory, exported at /metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest

from app.metrics import Resources, failures_in_a_row
from tests.support.service import FEATURES, admin_headers, metric_value, record


def test_drift_gauges_follow_the_recent_predictions_on_their_schedule(make_client: Callable[..., TestClient]) -> None:
    client = make_client(drift_interval_s=0.2, reload_interval_s=0.05, drift_window=50)
    rng = np.random.default_rng(0)
    for _ in range(60):  # bmi far from the training data, the rest as it was
        shifted = record(**{name: float(rng.normal(0, 0.04)) for name in FEATURES})
        shifted["bmi"] = float(rng.normal(0.12, 0.01))
        assert client.post("/predict", json={"features": shifted}).status_code == 200
    deadline = time.monotonic() + 30
    while True:
        exposition = client.get("/metrics").text
        window = metric_value(exposition, "mlapi_drift_window_predictions")
        if window == 50:
            break
        assert time.monotonic() < deadline, "the drift gauges were never computed"
        time.sleep(0.1)
    psi = {name: metric_value(exposition, "mlapi_feature_psi", feature=name) for name in FEATURES}
    assert max(psi, key=lambda name: psi[name]) == "bmi" and psi["bmi"] > 0.2, psi
    assert psi["age"] < psi["bmi"]


def test_the_replica_exports_its_volume_and_memory(client: TestClient) -> None:
    exposition = client.get("/metrics").text
    free = metric_value(exposition, "mlapi_data_volume_free_bytes")
    size = metric_value(exposition, "mlapi_data_volume_size_bytes")
    assert size and free and 0 < free <= size
    assert metric_value(exposition, "mlapi_retrain_consecutive_failures") == 0


def exported(collector: object) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_failed_retrains_count_in_a_row_from_the_shared_history() -> None:
    history = [{"outcome": "failed"}, {"outcome": "promoted"}, {"outcome": "failed"}, {"outcome": "failed"}]
    assert failures_in_a_row(history) == 2
    history.append({"outcome": "rejected"})  # a retrain that ran and judged is not a failure
    assert failures_in_a_row(history) == 0


def test_a_failed_retrain_shows_in_the_gauge_at_once(client: TestClient, monkeypatch) -> None:
    service = client.app.state.service

    def broken(*args, **kwargs):
        raise MemoryError("the candidate did not fit")

    monkeypatch.setattr("app.training.train", broken)
    for expected in (1, 2):
        assert client.post("/admin/retrain", headers=admin_headers()).json()["outcome"] == "failed"
        assert metric_value(client.get("/metrics").text, "mlapi_retrain_consecutive_failures") == expected
    assert service.history()[-1]["outcome"] == "failed"


def test_memory_is_read_from_the_cgroup_when_there_is_one(tmp_path: Path, monkeypatch) -> None:
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text("536870912\n")
    usage.write_text("123456789\n")
    monkeypatch.setattr("app.metrics.MEMORY_LIMIT_FILES", (str(limit),))
    monkeypatch.setattr("app.metrics.MEMORY_USAGE_FILES", (str(usage),))
    text = exported(Resources(tmp_path))
    assert metric_value(text, "mlapi_memory_limit_bytes") == 536870912
    assert metric_value(text, "mlapi_memory_usage_bytes") == 123456789
    limit.write_text("max\n")  # no limit: no gauge, so the alert cannot divide by a made-up number
    assert metric_value(exported(Resources(tmp_path)), "mlapi_memory_limit_bytes") is None
