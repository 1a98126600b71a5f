"""Training, conformal calibration (MAPIE split conformal), evaluation and out-of-distribution checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
from mapie.regression import SplitConformalRegressor
from pydantic import BaseModel
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from app.data import Dataset, fingerprint
from app.estimators import build_estimator

CALIBRATION_FRACTION = 0.25
PSI_BINS = 10


class FeatureProfile(BaseModel):
    name: str
    mean: float
    std: float
    min: float
    max: float
    bin_edges: list[float]  # interior quantile edges of the training data, for drift (PSI)
    bin_fractions: list[float]  # share of the training data in each bin (not uniform for discrete features)


class HoldoutMetrics(BaseModel):
    rmse: float
    mae: float
    r2: float
    coverage: dict[str, float]  # confidence level -> fraction of holdout targets inside the interval
    mean_interval_width: dict[str, float]


class ModelMetadata(BaseModel):
    name: str = ""  # the model project's name ("" in versions from before projects)
    version: str = ""
    parent: str | None = None
    created_at: str
    estimator: str
    data_fingerprint: str
    n_train: int
    n_calibration: int
    n_holdout: int
    n_observations: int
    confidence_levels: list[float]
    features: list[FeatureProfile]
    metrics: HoldoutMetrics
    sha256: str = ""  # of the skops file; checked before the file is parsed

    @property
    def feature_names(self) -> list[str]:
        return [feature.name for feature in self.features]

    def public(self) -> dict:
        """What anyone may see: the model, its schema and its holdout metrics, never the training data's statistics
        (means, ranges, quantiles: with the operator's own data they are the data)."""
        described = self.model_dump(exclude={"sha256", "features"})
        return {**described, "features": [{"name": feature.name, "type": "number"} for feature in self.features]}


def level_key(level: float) -> str:
    return f"{level:g}"


@dataclass
class Predictor:
    """A fitted conformal model plus the metadata it is served with."""

    conformal: SplitConformalRegressor
    metadata: ModelMetadata
    # Per level, the distance from the point down to the lower bound and up to the upper one, when they are the same
    # for every input; None until measured, () when they are not.
    _offsets: tuple[np.ndarray, np.ndarray] | tuple[()] | None = field(default=None, init=False, repr=False)

    def predict(self, X: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Point predictions and the interval bounds at ``confidence`` (one of the calibrated levels)."""
        index = self.metadata.confidence_levels.index(confidence)
        offsets = self.interval_offsets()
        if offsets:  # one model call: the bounds are the point minus and plus what MAPIE calibrated
            below, above = offsets
            points = self.conformal.predict(X)
            return points, points - below[index], points + above[index]
        points, intervals = self.conformal.predict_interval(X)
        return points, intervals[:, 0, index], intervals[:, 1, index]

    def interval_offsets(self) -> tuple[np.ndarray, np.ndarray] | tuple[()]:
        """Split conformal intervals with MAPIE's absolute conformity score are the point minus and plus a quantile
        of the calibration residuals: the same width for every input. Measured once, from MAPIE itself, on inputs
        spread over the training range; a score whose width depends on the input (the widths differ there) keeps
        MAPIE computing every interval."""
        if self._offsets is None:
            features = self.metadata.features
            probes = np.array(
                [
                    [f.mean for f in features],
                    [f.min for f in features],
                    [f.max for f in features],
                    [f.mean + f.std for f in features],
                ]
            )
            points, intervals = self.conformal.predict_interval(probes)
            below, above = points[:, None] - intervals[:, 0, :], intervals[:, 1, :] - points[:, None]
            scale = max(1.0, float(np.abs(points).max()))
            constant = all(np.allclose(side, side[0], rtol=0, atol=1e-9 * scale) for side in (below, above))
            self._offsets = (below[0], above[0]) if constant else ()
        return self._offsets

    def point(self, X: np.ndarray) -> np.ndarray:
        return self.conformal.predict(X)


def profile_features(data: Dataset) -> list[FeatureProfile]:
    profiles = []
    quantiles = np.linspace(0, 1, PSI_BINS + 1)[1:-1]
    for i, name in enumerate(data.feature_names):
        column = data.X[:, i]
        edges = np.unique(np.quantile(column, quantiles))
        counts = np.bincount(np.searchsorted(edges, column, side="right"), minlength=len(edges) + 1)
        profiles.append(
            FeatureProfile(
                name=name,
                mean=float(column.mean()),
                std=float(column.std()),
                min=float(column.min()),
                max=float(column.max()),
                bin_edges=[float(edge) for edge in edges],
                bin_fractions=[float(count) for count in counts / len(column)],
            )
        )
    return profiles


def evaluate(conformal: SplitConformalRegressor, levels: list[float], holdout: Dataset) -> HoldoutMetrics:
    points, intervals = conformal.predict_interval(holdout.X)
    if not np.isfinite(points).all() or not np.isfinite(intervals).all():
        raise ValueError("candidate produced non-finite predictions on the holdout")
    coverage, width = {}, {}
    for index, level in enumerate(levels):
        lower, upper = intervals[:, 0, index], intervals[:, 1, index]
        coverage[level_key(level)] = float(np.mean((holdout.y >= lower) & (holdout.y <= upper)))
        width[level_key(level)] = float(np.mean(upper - lower))
    return HoldoutMetrics(
        rmse=float(np.sqrt(mean_squared_error(holdout.y, points))),
        mae=float(mean_absolute_error(holdout.y, points)),
        r2=float(r2_score(holdout.y, points)),
        coverage=coverage,
        mean_interval_width=width,
    )


def train(
    development: Dataset,
    holdout: Dataset,
    *,
    estimator: str,
    levels: list[float],
    seed: int,
    n_observations: int = 0,
) -> Predictor:
    """Fit on part of ``development``, conformalize on the rest, measure on ``holdout``."""
    order = np.random.default_rng(seed + 1).permutation(len(development))
    n_calibration = max(10, round(len(development) * CALIBRATION_FRACTION))
    calibration, fit = order[:n_calibration], order[n_calibration:]
    X_fit, y_fit = development.X[fit], development.y[fit]
    model = build_estimator(estimator, seed).fit(X_fit, y_fit)
    conformal = SplitConformalRegressor(model, confidence_level=list(levels), prefit=True)
    conformal.conformalize(development.X[calibration], development.y[calibration])
    metadata = ModelMetadata(
        name=development.name,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        estimator=estimator,
        data_fingerprint=fingerprint(development.X, development.y),
        n_train=len(fit),
        n_calibration=len(calibration),
        n_holdout=len(holdout),
        n_observations=n_observations,
        confidence_levels=list(levels),
        features=profile_features(development),
        metrics=evaluate(conformal, list(levels), holdout),
    )
    return Predictor(conformal, metadata)


@dataclass(frozen=True)
class OutOfRange:
    feature: str
    value: float
    z_score: float
    train_min: float
    train_max: float


def out_of_distribution(
    X: np.ndarray, profiles: list[FeatureProfile], z_threshold: float, range_tolerance: float
) -> list[list[OutOfRange]]:
    """For each row, the features that lie far outside what the model was trained on.

    A value is out when it is beyond the training range by more than ``range_tolerance`` of that range, or more
    than ``z_threshold`` standard deviations from the training mean.
    """
    mean = np.array([p.mean for p in profiles])
    std = np.array([p.std if p.std > 0 else 1.0 for p in profiles])
    low = np.array([p.min for p in profiles])
    high = np.array([p.max for p in profiles])
    slack = (high - low) * range_tolerance
    z = (X - mean) / std
    flagged = (low - slack > X) | (high + slack < X) | (np.abs(z) > z_threshold)
    reasons: list[list[OutOfRange]] = []
    for row_index in range(len(X)):
        row = []
        for feature_index in np.flatnonzero(flagged[row_index]):
            profile = profiles[feature_index]
            row.append(
                OutOfRange(
                    feature=profile.name,
                    value=float(X[row_index, feature_index]),
                    z_score=round(float(z[row_index, feature_index]), 3),
                    train_min=profile.min,
                    train_max=profile.max,
                )
            )
        reasons.append(row)
    return reasons


def population_stability(values: np.ndarray, profile: FeatureProfile) -> float:
    """PSI of recent ``values`` against the training deciles of one feature (>0.25 is usually called drift)."""
    edges = np.asarray(profile.bin_edges)
    bins = len(edges) + 1
    expected = np.asarray(profile.bin_fractions)
    actual = np.bincount(np.searchsorted(edges, values, side="right"), minlength=bins) / max(len(values), 1)
    eps = 1e-4
    expected, actual = np.clip(expected, eps, None), np.clip(actual, eps, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))
