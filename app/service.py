"""The serving core: which model answers, how a new one is judged, and how it is swapped in without a hiccup."""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from app.data import Dataset, load_dataset, split_holdout
from app.metrics import ServiceMetrics
from app.model import OutOfRange, Predictor, evaluate, out_of_distribution, population_stability, train
from app.predlog import PredictionLog
from app.registry import Registry, RegistryError, write_json_line
from app.settings import Settings

log = logging.getLogger(__name__)


class RetrainBusy(RuntimeError):
    """Another retrain is running."""


class NotReady(RuntimeError):
    """No model is loaded."""


@dataclass
class RetrainOutcome:
    outcome: str  # "promoted" | "rejected" | "failed"
    reason: str
    current_version: str | None
    candidate_version: str | None = None
    candidate_metrics: dict | None = None
    current_metrics: dict | None = None
    n_observations: int = 0
    finished_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


@dataclass
class Prediction:
    version: str
    points: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    ood: list[list[OutOfRange]]


def load_admin_token(settings: Settings) -> str:
    """The configured token, or one generated once into the data directory (readable by the service user only)."""
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value()
    path = settings.data_dir / "admin-token"
    if not path.exists():
        token = secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process wrote it first; use theirs
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(token)
    return path.read_text().strip()


class ModelService:
    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.registry = Registry(settings.data_dir)
        self.dataset = load_dataset(settings.dataset, settings.target_column)
        self.prediction_log = PredictionLog(
            settings.data_dir / "predictions.sqlite3", settings.log_queue_size, on_drop=metrics.log_dropped.inc
        )
        self.history_path: Path = settings.data_dir / "retrain-history.jsonl"
        self.load_error: str | None = None
        self._current: Predictor | None = None
        self._retrain_lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Serve the current version; on an empty registry, train the first one from the base data."""
        version = self.registry.current()
        if version is None:
            development, holdout = self._splits()
            predictor = self._train(development, holdout, n_observations=0)
            version = self.registry.save(predictor, parent=None)
            self.registry.set_current(version)
            self._swap(predictor)
            log.info("trained initial model %s", version)
            return
        try:
            self._swap(self.registry.load(version))
        except RegistryError as exc:
            self.load_error = str(exc)
            log.error("not serving: %s (roll back to a good version via /admin/rollback)", exc)

    def close(self) -> None:
        self.prediction_log.close()

    @property
    def current(self) -> Predictor | None:
        return self._current

    def _swap(self, predictor: Predictor) -> None:
        self._current = predictor  # a single reference assignment: each request sees the old or the new, whole
        self.load_error = None
        self.metrics.model.info({"version": predictor.metadata.version, "estimator": predictor.metadata.estimator})

    # -- predictions --------------------------------------------------------------------------------------------
    def predict(self, X: np.ndarray, confidence: float) -> Prediction:
        predictor = self._current
        if predictor is None:
            raise NotReady(self.load_error or "no model loaded yet")
        points, lower, upper = predictor.predict(X, confidence)
        ood = out_of_distribution(
            X, predictor.metadata.features, self.settings.ood_z_threshold, self.settings.ood_range_tolerance
        )
        return Prediction(predictor.metadata.version, points, lower, upper, ood)

    # -- retraining ---------------------------------------------------------------------------------------------
    def _splits(self) -> tuple[Dataset, Dataset]:
        development, holdout = split_holdout(self.dataset, self.settings.seed)
        stored = self.registry.load_holdout(self.dataset.feature_names)
        if stored is None:
            self.registry.save_holdout(holdout)
            return development, holdout
        return development, stored

    def _train(self, development: Dataset, holdout: Dataset, n_observations: int) -> Predictor:
        return train(
            development,
            holdout,
            estimator=self.settings.estimator,
            levels=self.settings.confidence_levels,
            seed=self.settings.seed,
            n_observations=n_observations,
        )

    def retrain(self) -> RetrainOutcome:
        """Newest data → candidate → judged on the fixed holdout → promoted only if better by the margin."""
        if not self._retrain_lock.acquire(blocking=False):
            raise RetrainBusy("a retrain is already running")
        try:
            outcome = self._retrain_locked()
        finally:
            self._retrain_lock.release()
        self.metrics.retrains.labels(outcome.outcome).inc()
        self.metrics.last_retrain.set(time.time())
        self.metrics.last_retrain_promoted.set(1 if outcome.outcome == "promoted" else 0)
        write_json_line(self.history_path, outcome.__dict__)
        log.info("retrain %s: %s", outcome.outcome, outcome.reason)
        return outcome

    def _retrain_locked(self) -> RetrainOutcome:
        current = self._current
        current_version = current.metadata.version if current else None
        obs_X, obs_y = self.prediction_log.observations()
        try:
            development, holdout = self._splits()
            if len(obs_y) and obs_X.shape[1] != len(self.dataset.feature_names):
                raise ValueError(
                    f"stored observations have {obs_X.shape[1]} features, the dataset has "
                    f"{len(self.dataset.feature_names)}"
                )
            candidate = self._train(development.extend(obs_X, obs_y), holdout, n_observations=len(obs_y))
        except Exception as exc:  # a broken candidate must never take the service down
            log.exception("retrain: candidate failed")
            return RetrainOutcome("failed", f"candidate failed: {exc}", current_version, n_observations=len(obs_y))
        candidate_metrics = candidate.metadata.metrics
        if current is not None:
            current_metrics = evaluate(current.conformal, current.metadata.confidence_levels, holdout)
            required = current_metrics.rmse * (1 - self.settings.promotion_margin)
            if not candidate_metrics.rmse < required:
                return RetrainOutcome(
                    "rejected",
                    f"candidate holdout RMSE {candidate_metrics.rmse:.4f} is not below {required:.4f} "
                    f"(current {current_metrics.rmse:.4f}, margin {self.settings.promotion_margin:g})",
                    current_version,
                    candidate_metrics=candidate_metrics.model_dump(),
                    current_metrics=current_metrics.model_dump(),
                    n_observations=len(obs_y),
                )
        else:
            current_metrics = None
        version = self.registry.save(candidate, parent=current_version)
        self.registry.set_current(version)
        self._swap(candidate)
        return RetrainOutcome(
            "promoted",
            f"candidate holdout RMSE {candidate_metrics.rmse:.4f} beats "
            + (f"{current_metrics.rmse:.4f}" if current_metrics else "no current model"),
            version,
            candidate_version=version,
            candidate_metrics=candidate_metrics.model_dump(),
            current_metrics=current_metrics.model_dump() if current_metrics else None,
            n_observations=len(obs_y),
        )

    def rollback(self, version: str) -> Predictor:
        """Serve an earlier version; a missing or untrusted one raises and the current model keeps serving."""
        with self._retrain_lock:
            predictor = self.registry.load(version)
            self.registry.set_current(version)
            self._swap(predictor)
        return predictor

    def history(self, limit: int = 20) -> list[dict]:
        if not self.history_path.exists():
            return []
        lines = self.history_path.read_text().splitlines()[-limit:]
        return [json.loads(line) for line in lines]

    # -- monitoring ---------------------------------------------------------------------------------------------
    def drift(self, window: int) -> dict:
        predictor = self._current
        if predictor is None:
            raise NotReady(self.load_error or "no model loaded yet")
        self.prediction_log.flush(timeout=2)
        recent = self.prediction_log.recent_features(window)
        features = {}
        if len(recent):
            for index, profile in enumerate(predictor.metadata.features):
                features[profile.name] = round(population_stability(recent[:, index], profile), 4)
        return {"model_version": predictor.metadata.version, "window": len(recent), "psi": features}
