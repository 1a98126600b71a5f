"""Prometheus metrics of the model itself; HTTP metrics come from prometheus-fastapi-instrumentator."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.model = Info("mlapi_model", "The model version being served.", registry=registry)
        self.predictions = Counter("mlapi_predictions_total", "Rows predicted, by route.", ["route"], registry=registry)
        self.ood = Counter("mlapi_ood_predictions_total", "Rows flagged out of distribution.", registry=registry)
        self.retrains = Counter("mlapi_retrains_total", "Retrain attempts by outcome.", ["outcome"], registry=registry)
        self.last_retrain = Gauge(
            "mlapi_last_retrain_timestamp_seconds", "When the last retrain finished.", registry=registry
        )
        self.last_retrain_promoted = Gauge(
            "mlapi_last_retrain_promoted", "1 if the last retrain promoted its candidate, else 0.", registry=registry
        )
        self.log_dropped = Counter(
            "mlapi_prediction_log_dropped_total",
            "Prediction log records lost (queue full or disk error).",
            registry=registry,
        )
        self.observations = Counter("mlapi_observations_total", "Ground-truth observations stored.", registry=registry)
        self.coalesced_rows = Histogram(
            "mlapi_predict_coalesced_rows",
            "Single-row /predict and V2 requests answered by one model call (app/batching.py).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=registry,
        )


class BackupStatus(Collector):
    """The host's backup job writes its outcome into the data directory; exported at every scrape, so an alert on
    `time() - mlapi_backup_last_success_timestamp_seconds` sees a backup that stopped running."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            state = {}
        for name, key, text in (
            ("last_success_timestamp_seconds", "last_success_unixtime", "When the last backup succeeded (0: never)."),
            ("last_failure_timestamp_seconds", "last_failure_unixtime", "When the last backup failed (0: never)."),
            ("snapshots", "snapshots", "Snapshots in the repository after the last successful backup."),
        ):
            yield GaugeMetricFamily(f"mlapi_backup_{name}", text, value=float(state.get(key, 0)))
