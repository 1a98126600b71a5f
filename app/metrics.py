"""Prometheus metrics of the model itself; HTTP metrics come from prometheus-fastapi-instrumentator."""

from __future__ import annotations

import json
import shutil
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
        self.handovers = Counter(
            "mlapi_handover_requests_total",
            "Predictions refused here and offered to the other replicas (a project switch), by whether one of another "
            "generation answered.",
            ["outcome"],
            registry=registry,
        )
        # Drift on a schedule (drift_interval_s), not per request: what the FeatureDrift alert reads.
        self.feature_psi = Gauge(
            "mlapi_feature_psi",
            "Population stability index of a feature: recent predictions against the training data.",
            ["feature"],
            registry=registry,
        )
        # From the shared history, refreshed at start, after a retrain and with the drift gauges: never read from
        # the store at scrape time (a scrape must answer while the database restarts).
        self.retrain_failures = Gauge(
            "mlapi_retrain_consecutive_failures",
            "Retrains that failed in a row, whichever replica ran them (0: the last one did not).",
            registry=registry,
        )
        self.drift_window = Gauge(
            "mlapi_drift_window_predictions", "Recent predictions the drift gauges cover.", registry=registry
        )
        self.coalesced_rows = Histogram(
            "mlapi_predict_coalesced_rows",
            "Single-row /predict and V2 requests answered by one model call (app/batching.py).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=registry,
        )

    def count_handover(self, answered: bool) -> None:
        self.handovers.labels(outcome="answered" if answered else "refused everywhere").inc()


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


def failures_in_a_row(history: list[dict]) -> int:
    """Retrains that failed in a row at the end of ``history`` (0: the last one did not)."""
    streak = 0
    for entry in reversed(history):
        if entry.get("outcome") != "failed":
            break
        streak += 1
    return streak


# cgroup v2, then v1: what the container may use and uses (the MemoryNearLimit alert's two sides).
MEMORY_LIMIT_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
MEMORY_USAGE_FILES = ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes")
NO_LIMIT = 2**60  # v1 says "no limit" with a number near 2^63


def first_number(paths: tuple[str, ...]) -> float | None:
    for path in paths:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        return float(text) if text.isdigit() and int(text) < NO_LIMIT else None
    return None


class Resources(Collector):
    """The data volume's size and free bytes, and the container's memory use and limit, read at each scrape."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            usage = shutil.disk_usage(self.data_dir)
        except OSError:
            usage = None
        if usage is not None:
            yield GaugeMetricFamily("mlapi_data_volume_size_bytes", "Size of the data volume.", usage.total)
            yield GaugeMetricFamily("mlapi_data_volume_free_bytes", "Free bytes on the data volume.", usage.free)
        limit, used = first_number(MEMORY_LIMIT_FILES), first_number(MEMORY_USAGE_FILES)
        if limit is not None:
            yield GaugeMetricFamily("mlapi_memory_limit_bytes", "The container's memory limit.", limit)
        if used is not None:
            yield GaugeMetricFamily("mlapi_memory_usage_bytes", "The container's memory use (its cgroup).", used)
