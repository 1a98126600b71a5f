"""The serving core: which model answers, how a new one is judged, and how it is swapped in without a hiccup."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from app.data import Dataset, DatasetError, data_cache, refetched
from app.datasource import redacted
from app.metrics import ServiceMetrics, failures_in_a_row
from app.model import (
    PROMOTION_METRIC,
    OutOfRange,
    Predictor,
    evaluate,
    out_of_distribution,
    population_stability,
)
from app.project import other_sklearn_minor
from app.registry import Registry, RegistryError
from app.schemas import AcceptedRanges
from app.settings import Settings
from app.stores import open_stores
from app.training import development_and_holdout, train_first_version, train_version
from app.training_process import train_in_child

if TYPE_CHECKING:
    from app.pgregistry import SharedRegistry
    from app.predlog import PredictionLog

log = logging.getLogger(__name__)
METRIC_NAMES = {"rmse": "RMSE", "log_loss": "log-loss"}


class NotReady(RuntimeError):
    """No model is loaded."""


def check_sklearn_version(version: str, trained_with: str) -> None:
    """A version trained under another scikit-learn minor version may load and answer differently (its estimators'
    internals change between minors): refused, both versions named. Versions from before it was recorded pass."""
    running = other_sklearn_minor(trained_with)
    if running:
        raise RegistryError(
            f"version {version} was trained with scikit-learn {trained_with}, this service runs {running}: retrain "
            "it (POST /admin/retrain) or serve it from an image with the same scikit-learn minor version"
        )


@dataclass
class RetrainOutcome:
    outcome: str  # "promoted" | "rejected" | "failed"
    reason: str
    current_version: str | None
    candidate_version: str | None = None
    candidate_metrics: dict | None = None
    current_metrics: dict | None = None
    n_observations: int = 0
    quarantined: int = 0  # observations left out: equal to a holdout row, or outside the accepted ranges
    data_sha256: str = ""  # of the data the candidate was trained on
    finished_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


@dataclass
class Prediction:
    """Regression: ``points`` and the interval bounds. Classification: ``points`` are the label codes, ``lower`` and
    ``upper`` both the label's probability (what the prediction log keeps), ``probabilities`` per class and
    ``sets`` the conformal prediction set as a boolean matrix."""

    version: str
    points: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    ood: list[list[OutOfRange]]
    probabilities: np.ndarray | None = None
    sets: np.ndarray | None = None

    def rows(self, n: int) -> list[Prediction]:
        """One single-row Prediction per row, in order (how a coalesced call is handed back to its requests)."""
        return [
            Prediction(
                self.version,
                self.points[i : i + 1],
                self.lower[i : i + 1],
                self.upper[i : i + 1],
                self.ood[i : i + 1],
                None if self.probabilities is None else self.probabilities[i : i + 1],
                None if self.sets is None else self.sets[i : i + 1],
            )
            for i in range(n)
        ]


HOLDOUT_NEIGHBOURHOOD = 1e-3  # of each feature's training span: closer than this to a holdout row is that row


class ModelService:
    def __init__(self, settings: Settings, metrics: ServiceMetrics, dataset: Dataset) -> None:
        """``dataset``: the configured data (app.data.load_configured), loaded once by whoever builds the app."""
        self.settings = settings
        self.metrics = metrics
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.registry: Registry | SharedRegistry
        self.prediction_log: PredictionLog
        self.dataset = dataset
        self.registry, self.prediction_log = open_stores(
            settings, metrics.log_dropped.inc, self.dataset.store, self.dataset.trusted_types
        )
        self.ranges = AcceptedRanges.of(self.dataset, settings.input_range_multiple)
        spans = np.nanmax(self.dataset.X, axis=0) - np.nanmin(self.dataset.X, axis=0)
        self.holdout_tolerance = HOLDOUT_NEIGHBOURHOOD * np.where(spans > 0, spans, 1.0)
        self.load_error: str | None = None
        self._current: Predictor | None = None
        self._failed_version: str | None = None
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch_registry, name="registry-watch", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Serve the current version. An empty registry starts from this node's file registry (a single-VM stack
        that grew), else from the first version built into the image (`python -m app train` in app/Dockerfile), else
        trains one here, which only a service run outside the image should need. Then follow the registry's current
        pointer, so a promotion or rollback made by any replica reaches this one."""
        if self.registry.current() is None and self._may_seed():
            with self.registry.lock(blocking=True):  # replicas starting together make one first version
                if (
                    self.registry.current() is None
                    and not self._import_node_registry()
                    and not self._import_built_version()
                ):
                    version = train_first_version(self.settings, self.dataset, self.registry)
                    log.warning(
                        "trained the first version %s in the serving process: no first version was built for this "
                        "data (%s)",
                        version,
                        "MLAPI_FIRST_VERSION_DIR is unset"
                        if self.settings.first_version_dir is None
                        else f"none under {self.settings.first_version_dir}",
                    )
        self.sync_with_registry()  # a replica that may not seed serves once the seeding one has (the watcher)
        self._watcher.start()

    def _may_seed(self) -> bool:
        marker = self.settings.seed_marker
        if marker is None or marker.exists():
            return True
        log.info("waiting for the shared registry's first version (seeded where %s exists)", marker)
        return False

    def _import_node_registry(self) -> bool:
        """A shared registry starts from this node's file registry, if it has one (a single-VM stack that grew):
        every version, the current pointer, the holdout and its seed, the history. True if something came over."""
        if isinstance(self.registry, Registry):
            return False
        local = Registry(self.settings.data_dir / self.dataset.store, self.dataset.trusted_types)
        if local.current() is None:
            return False
        imported = self.registry.import_from(local)
        log.info("imported %d versions from %s into the shared registry", imported, local.root)
        return True

    def _import_built_version(self) -> bool:
        """The first version trained when the image was built (read-only there), copied into the registry. True if
        one was there for this data and its holdout is this installation's (none made or pinned yet, or the same)."""
        directory = self.settings.first_version_dir
        if directory is None or not (directory / self.dataset.store / "models" / "CURRENT").is_file():
            return False
        built = Registry(directory / self.dataset.store, self.dataset.trusted_types)
        wanted = self.settings.holdout_seed
        if wanted is None:
            wanted = self.registry.known_holdout_seed()
        if wanted is not None and wanted != built.known_holdout_seed():
            # The installation's holdout is made once and kept (pinned, or left by an earlier registry): a version
            # judged on the image's own split would be compared with later ones on another.
            log.info("the first version built into the image was judged on another holdout than this installation's")
            return False
        imported = self.registry.import_from(built)
        log.info("first version %s: the one built into the image (%d imported)", built.current(), imported)
        return True

    def sync_with_registry(self) -> bool:
        """Serve the registry's current version if it is not the one served; True if a swap happened."""
        version = self.registry.current()
        served = self._current.metadata.version if self._current else None
        if version is None or version == served or version == self._failed_version:
            return False
        try:
            predictor = self._load_matching(version)
        except RegistryError as exc:
            self._failed_version = version  # logged once, retried when the pointer moves again
            self.load_error = str(exc)
            log.error("not serving %s: %s (the previous model, if any, keeps serving)", version, exc)
            return False
        self._failed_version = None
        self._swap(predictor)
        log.info("now serving %s (was %s)", version, served)
        return True

    def _load_matching(self, version: str) -> Predictor:
        """A version trained on this service's features, in its order: any other would answer requests of another
        schema with a 500, or silently wrong when the column counts happen to match."""
        predictor = self.registry.load(version)
        metadata = predictor.metadata
        trained_on, configured = metadata.feature_names, list(self.dataset.feature_names)
        if trained_on != configured:
            raise RegistryError(
                f"version {version} was trained on the features {trained_on}, but the configured data has "
                f"{configured}: a changed dataset needs a model project (MLAPI_MODEL_PROJECT), which keeps a registry "
                "per schema, or the data the registry was trained on"
            )
        if metadata.schema() != self.dataset.schema:
            raise RegistryError(
                f"version {version} was trained as a {metadata.task} on other feature types, values or classes than "
                "the configured data declares: a model project keeps a registry per schema"
            )
        check_sklearn_version(version, metadata.sklearn_version)
        return predictor

    def _watch_registry(self) -> None:
        next_drift = time.monotonic()
        while not self._stop.wait(self.settings.reload_interval_s):
            try:
                self.sync_with_registry()
                if time.monotonic() >= next_drift:
                    next_drift = time.monotonic() + self.settings.drift_interval_s
                    self.update_drift_gauges()
                    self.update_retrain_streak()
            except Exception:  # never let the watcher die: the next tick tries again
                log.exception("registry watch failed")

    def update_retrain_streak(self) -> None:
        """The failed-in-a-row gauge from the shared history (another replica's retrains count too)."""
        self.metrics.retrain_failures.set(failures_in_a_row(self.registry.history(50)))

    def update_drift_gauges(self) -> None:
        """The drift gauges over the last ``drift_window`` predictions (nothing yet: none are set)."""
        if self._current is None:
            return
        found = self.drift(self.settings.drift_window)
        self.metrics.drift_window.set(found["window"])
        for feature, psi in found["psi"].items():
            self.metrics.feature_psi.labels(feature).set(psi)

    def close(self) -> None:
        self._stop.set()
        if self._watcher.is_alive():
            self._watcher.join(timeout=5)
        self.prediction_log.close()
        if not isinstance(self.registry, Registry):
            self.registry.close()

    @property
    def current(self) -> Predictor | None:
        return self._current

    def _swap(self, predictor: Predictor) -> None:
        predictor.interval_offsets()  # measured before it serves, not on its first request
        self._current = predictor  # a single reference assignment: each request sees the old or the new, whole
        self.load_error = None
        self.metrics.model.info({"version": predictor.metadata.version, "estimator": predictor.metadata.estimator})

    # -- predictions --------------------------------------------------------------------------------------------
    def predict(self, X: np.ndarray, confidence: float) -> Prediction:
        predictor = self._current
        if predictor is None:
            raise NotReady(self.load_error or "no model loaded yet")
        ood = out_of_distribution(
            X, predictor.metadata.features, self.settings.ood_z_threshold, self.settings.ood_range_tolerance
        )
        if predictor.metadata.task == "classification":
            probabilities, sets = predictor.classify(X, confidence)
            labels = probabilities.argmax(axis=1)
            chosen = probabilities[np.arange(len(labels)), labels]
            version = predictor.metadata.version
            return Prediction(version, labels.astype(np.float64), chosen, chosen, ood, probabilities, sets)
        points, lower, upper = predictor.predict(X, confidence)
        return Prediction(predictor.metadata.version, points, lower, upper, ood)

    # -- retraining ---------------------------------------------------------------------------------------------
    def _splits(self) -> tuple[Dataset, Dataset]:
        return development_and_holdout(self.settings, self.dataset, self.registry)

    def retrain(self, phase: Callable[[str], None] = lambda text: None) -> RetrainOutcome:
        """Newest data → candidate → judged on the fixed holdout → promoted only if better by the margin.
        ``phase``: told each step as it begins or ends (`mlapi retrain` shows them)."""
        with self.registry.lock(blocking=False):
            self.sync_with_registry()  # judge against what the registry says is current, not a stale copy
            outcome = self._retrain_locked(phase)
        self.metrics.retrains.labels(outcome.outcome).inc()
        self.metrics.last_retrain.set(time.time())
        self.metrics.last_retrain_promoted.set(1 if outcome.outcome == "promoted" else 0)
        self.registry.append_history(outcome.__dict__)
        self.update_retrain_streak()
        log.info("retrain %s: %s", outcome.outcome, outcome.reason)
        return outcome

    def _retrain_locked(self, phase: Callable[[str], None]) -> RetrainOutcome:
        current = self._current
        current_version = current.metadata.version if current else None
        quarantined = 0
        obs_y = np.empty(0)
        if self.dataset.data_url is not None:
            phase(f"fetching the data from {redacted(self.dataset.data_url)}")
            try:
                self.dataset = refetched(self.dataset, self.settings.model_project, data_cache(self.settings))
            except DatasetError as exc:
                return RetrainOutcome(
                    "failed", f"the data could not be fetched: {exc}; {current_version} keeps serving", current_version
                )
        try:
            phase("reading the project's data and the observations")
            development, holdout = self._splits()
            limit = max(1, int(len(development) * self.settings.max_observation_ratio))
            obs_X, obs_y = self.prediction_log.observations(limit=limit)
            if len(obs_y) and obs_X.shape[1] != len(self.dataset.feature_names):
                raise ValueError(
                    f"stored observations have {obs_X.shape[1]} features, the dataset has "
                    f"{len(self.dataset.feature_names)}"
                )
            obs_X, obs_y, quarantined = self._admissible(obs_X, obs_y, holdout)
            phase(
                f"training a candidate on {len(development)} rows and {len(obs_y)} observations "
                f"({quarantined} quarantined); the holdout: {len(holdout)} rows"
            )
            candidate = self._train_candidate(development.extend(obs_X, obs_y), holdout, len(obs_y))
        except Exception as exc:  # a broken candidate must never take the service down
            log.exception("retrain: candidate failed")
            return RetrainOutcome(
                "failed",
                f"candidate failed: {exc}",
                current_version,
                n_observations=len(obs_y),
                quarantined=quarantined,
                data_sha256=self.dataset.data_sha256,
            )
        candidate_metrics = candidate.metadata.metrics
        metric = PROMOTION_METRIC[candidate.metadata.task]
        label = f"candidate holdout {METRIC_NAMES[metric]}"
        phase(f"{label} {candidate_metrics.score:.4f}" + (f"; judging it against {current_version}" if current else ""))
        if current is not None:
            current_metrics = evaluate(current.conformal, current.metadata.confidence_levels, holdout)
            required = current_metrics.score * (1 - self.settings.promotion_margin)
            if not candidate_metrics.score < required:
                return RetrainOutcome(
                    "rejected",
                    f"{label} {candidate_metrics.score:.4f} is not below {required:.4f} "
                    f"(current {current_metrics.score:.4f}, margin {self.settings.promotion_margin:g})",
                    current_version,
                    candidate_metrics=candidate_metrics.model_dump(),
                    current_metrics=current_metrics.model_dump(),
                    n_observations=len(obs_y),
                    quarantined=quarantined,
                    data_sha256=self.dataset.data_sha256,
                )
        else:
            current_metrics = None
        phase("saving and promoting the candidate")
        version = self.registry.save(candidate, parent=current_version)
        self.registry.set_current(version)
        self._swap(candidate)
        return RetrainOutcome(
            "promoted",
            f"{label} {candidate_metrics.score:.4f} beats "
            + (f"{current_metrics.score:.4f}" if current_metrics else "no current model"),
            version,
            candidate_version=version,
            candidate_metrics=candidate_metrics.model_dump(),
            current_metrics=current_metrics.model_dump() if current_metrics else None,
            n_observations=len(obs_y),
            quarantined=quarantined,
            data_sha256=self.dataset.data_sha256,
        )

    def _train_candidate(self, development: Dataset, holdout: Dataset, n_observations: int) -> Predictor:
        """In a process of its own (app/training_process.py), unless isolation is off (tests that patch training)."""
        if self.settings.retrain_isolation:
            return train_in_child(self.settings, self.dataset, development, holdout, n_observations)
        return train_version(self.settings, self.dataset, development, holdout, n_observations)

    def _admissible(self, X: np.ndarray, y: np.ndarray, holdout: Dataset) -> tuple[np.ndarray, np.ndarray, int]:
        """Observations a candidate may learn from. Left out (quarantined, counted, never fatal): rows equal or
        nearly equal to a holdout row (learning them would fake a better holdout score), and rows outside the
        accepted ranges or not finite (stored before the limits existed; they would break the fit)."""
        if not len(y):
            return X, y, 0
        keep = self.ranges.admits(X, y)
        # Near-duplicates too: a holdout row nudged in the last digits is still the holdout row.
        tolerance = self.holdout_tolerance
        candidates = np.flatnonzero(keep)  # only rows in range: far-out values cannot be near the holdout
        for start in range(0, len(candidates), 4096):
            chunk = candidates[start : start + 4096]
            near = (np.abs(X[chunk, None, :] - holdout.X[None, :, :]) <= tolerance).all(axis=2).any(axis=1)
            keep[chunk[near]] = False
        return X[keep], y[keep], int((~keep).sum())

    def rollback(self, version: str) -> Predictor:
        """Serve an earlier version; a missing or untrusted one raises and the current model keeps serving."""
        with self.registry.lock(blocking=True):
            predictor = self._load_matching(version)
            self.registry.set_current(version)
            self._swap(predictor)
        return predictor

    def history(self, limit: int = 20) -> list[dict]:
        return self.registry.history(limit)

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
