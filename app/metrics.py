"""Prometheus metrics of the model itself; HTTP metrics come from prometheus-fastapi-instrumentator."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Info


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
