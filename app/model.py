"""Training, conformal calibration (MAPIE split conformal), evaluation and out-of-distribution checks.

Regression answers with intervals (``SplitConformalRegressor``); classification with the label, the class
probabilities and a conformal prediction set (``SplitConformalClassifier`` with the APS score, the top label always
included: a set grows with the input's ambiguity and is never empty; docs/model-projects.md says why that one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sklearn
from mapie.classification import SplitConformalClassifier
from mapie.regression import SplitConformalRegressor
from mapie.utils import check_proba_normalized
from pydantic import BaseModel
from sklearn.metrics import accuracy_score, f1_score, log_loss, mean_absolute_error, mean_squared_error, r2_score
from sklearn.pipeline import Pipeline

from app.compiled import Step, UnknownCategory, compile_pipeline, covering_rows
from app.data import Dataset, fingerprint, split_share
from app.estimators import build_pipeline, frame_step
from app.tabular import Column, Schema

CALIBRATION_FRACTION = 0.25
PSI_BINS = 10
CONFORMITY_SCORE = "aps"  # LAC gave smaller sets but an empty one for exactly the ambiguous inputs


class FeatureProfile(BaseModel):
    name: str
    type: str = "number"  # number | integer | boolean | category (versions from before projects: number)
    nullable: bool = False
    values: list[str] = []  # a category's closed set, in code order
    missing: float = 0.0  # share of gaps in the training data
    mean: float
    std: float
    min: float
    max: float
    bin_edges: list[float]  # interior quantile edges of the training data, for drift (PSI); categories: k + 0.5
    bin_fractions: list[float]  # share of the training data in each bin (not uniform for discrete features)

    @property
    def numeric(self) -> bool:
        return self.type in ("number", "integer")


class HoldoutMetrics(BaseModel):
    rmse: float
    mae: float
    r2: float
    coverage: dict[str, float]  # confidence level -> fraction of holdout targets inside the interval
    mean_interval_width: dict[str, float]

    @property
    def score(self) -> float:
        return self.rmse


class ClassificationMetrics(BaseModel):
    accuracy: float
    macro_f1: float
    log_loss: float
    coverage: dict[str, float]  # confidence level -> fraction of holdout labels inside the prediction set
    mean_set_size: dict[str, float]

    @property
    def score(self) -> float:
        return self.log_loss


PROMOTION_METRIC = {"regression": "rmse", "classification": "log_loss"}  # lower is better for both


class ModelMetadata(BaseModel):
    name: str = ""  # the model project's name ("" in versions from before projects)
    task: str = "regression"
    classes: list[str] = []  # classification: the labels, in the order of the probabilities
    sklearn_version: str = ""  # scikit-learn it was trained with ("" in versions from before it was recorded)
    version: str = ""
    parent: str | None = None
    created_at: str
    estimator: str
    data_fingerprint: str
    data_sha256: str = ""  # of the data file the version was trained on (fetched, for a URL); "" before it was kept
    n_train: int
    n_calibration: int
    n_holdout: int
    holdout_split: str = "random"  # how the holdout was drawn: "random", or "time: the latest rows by '<column>'"
    n_observations: int
    confidence_levels: list[float]
    features: list[FeatureProfile]
    metrics: HoldoutMetrics | ClassificationMetrics
    sha256: str = ""  # of the skops file; checked before the file is parsed

    @property
    def feature_names(self) -> list[str]:
        return [feature.name for feature in self.features]

    def public(self) -> dict:
        """What anyone may see: the model, its schema and its holdout metrics, never the training data's statistics
        (means, ranges, quantiles: with the operator's own data they are the data)."""
        described = self.model_dump(exclude={"sha256", "features"})
        return {**described, "promotion_metric": PROMOTION_METRIC[self.task], "features": self.schema().describe()}

    def schema(self) -> Schema:
        columns = tuple(Column(f.name, f.type, f.nullable, tuple(f.values)) for f in self.features)
        return Schema(columns, "classification" if self.task == "classification" else "regression", tuple(self.classes))


def level_key(level: float) -> str:
    return f"{level:g}"


@dataclass
class Predictor:
    """A fitted conformal model plus the metadata it is served with."""

    conformal: SplitConformalRegressor | SplitConformalClassifier
    metadata: ModelMetadata
    # Per level, the distance from the point down to the lower bound and up to the upper one, when they are the same
    # for every input; None until measured, () when they are not.
    _offsets: tuple[np.ndarray, np.ndarray] | tuple[()] | None = field(default=None, init=False, repr=False)
    # The fitted pipeline as array operations (app/compiled.py) once it gave scikit-learn's answers; False when it
    # cannot be compiled or did not; None until tried.
    _compiled: Step | bool | None = field(default=None, init=False, repr=False)

    def predict(self, X: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Point predictions and the interval bounds at ``confidence`` (one of the calibrated levels)."""
        index = self.metadata.confidence_levels.index(confidence)
        offsets = self.interval_offsets()
        if offsets:  # one model call: the bounds are the point minus and plus what MAPIE calibrated
            below, above = offsets
            points = self.point(X)
            return points, points - below[index], points + above[index]
        points, intervals = self.conformal.predict_interval(X)
        return points, intervals[:, 0, index], intervals[:, 1, index]

    def interval_offsets(self) -> tuple[np.ndarray, np.ndarray] | tuple[()]:
        """Split conformal intervals with MAPIE's absolute conformity score are the point minus and plus a quantile
        of the calibration residuals: the same width for every input. Measured once, from MAPIE itself, on inputs
        spread over the training range; a score whose width depends on the input (the widths differ there) keeps
        MAPIE computing every interval."""
        if self._offsets is None:
            if self.metadata.task == "classification":
                self._offsets = ()
                return self._offsets
            probes = self.probe_rows()
            points, intervals = self.conformal.predict_interval(probes)
            below, above = points[:, None] - intervals[:, 0, :], intervals[:, 1, :] - points[:, None]
            scale = max(1.0, float(np.abs(points).max()))
            constant = all(np.allclose(side, side[0], rtol=0, atol=1e-9 * scale) for side in (below, above))
            self._offsets = (below[0], above[0]) if constant else ()
        return self._offsets

    def point(self, X: np.ndarray) -> np.ndarray:
        """A regressor's point predictions."""
        return self._outputs(X)

    def _outputs(self, X: np.ndarray) -> np.ndarray:
        """What the fitted pipeline answers (a classifier's probabilities, a regressor's points): the compiled
        pipeline once it agreed with scikit-learn, else scikit-learn's own."""
        compiled = self.compiled()
        if compiled is not None:
            try:
                return compiled(X)
            except UnknownCategory:
                pass  # scikit-learn's own error
        return self._reference(X)

    def _fitted(self) -> Any:
        """The fitted estimator inside MAPIE's split conformal wrapper (MAPIE is pinned)."""
        if self.metadata.task == "classification":
            return self.conformal._mapie_classifier.estimator_.single_estimator_
        return self.conformal._mapie_regressor.estimator_.single_estimator_

    def _reference(self, X: np.ndarray) -> np.ndarray:
        """What scikit-learn answers: the classifier's probabilities, the regressor's points."""
        if self.metadata.task == "classification":
            # Finite-checks skipped: the request schema refused non-finite numbers; NaN gaps are the imputers' to fill.
            with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
                return self._fitted().predict_proba(X)
        return self.conformal.predict(X)

    def compiled(self) -> Step | None:
        """The compiled pipeline, once it answered as scikit-learn does on rows covering every gap and category."""
        if self._compiled is None:
            self._compiled = False
            compiled = compile_pipeline(self._fitted())
            if compiled is not None:
                schema = self.metadata.schema()
                sizes = {i: len(c.values) or 2 for i, c in enumerate(schema.columns) if not c.numeric}
                rows = covering_rows(self.probe_rows(), schema.nullable_mask, sizes)
                expected, got = self._reference(rows), compiled(rows)
                if got.shape == expected.shape and np.allclose(got, expected, rtol=1e-9, atol=1e-12):
                    self._compiled = compiled
        return self._compiled or None

    def probe_rows(self) -> np.ndarray:
        """Valid inputs spread over the training range: each measurement at its mean, minimum, maximum and mean plus
        one standard deviation; each category and boolean at its first value (code 0)."""
        features = self.metadata.features
        numeric = np.array([f.numeric for f in features])
        return np.array(
            [
                np.where(numeric, [f.mean for f in features], 0.0),
                np.where(numeric, [f.min for f in features], 0.0),
                np.where(numeric, [f.max for f in features], 0.0),
                np.where(numeric, [f.mean + f.std for f in features], 0.0),
            ]
        )

    def answers(self) -> bool:
        """The readiness probe: a typical input gets a finite answer."""
        probe = self.probe_rows()[:1]
        if self.metadata.task == "classification":
            probabilities, _ = self.classify(probe, self.metadata.confidence_levels[0])
            return bool(np.isfinite(probabilities).all())
        return bool(np.isfinite(self.point(probe)).all())

    def classify(self, X: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities (rows sum to 1, columns in ``metadata.classes`` order) and the conformal prediction
        set at ``confidence`` as a boolean matrix of the same shape.

        One pass through the pipeline: MAPIE's ``predict_set`` would run ``predict_proba`` again, after the call that
        gives the probabilities (half of a single-row answer's time with a pandas ColumnTransformer). So the
        probabilities go to MAPIE's own set function, called as ``_MapieClassifier.predict`` calls it (MAPIE is
        pinned; tests/unit/test_classification.py holds the sets equal to ``predict_set``'s)."""
        inner = self.conformal._mapie_classifier
        probabilities = check_proba_normalized(self._outputs(X), axis=1)
        sets = inner.conformity_score_function_.predict_set(
            X,
            np.array([1 - confidence]),
            y_pred_proba=probabilities,
            cv=inner.estimator_.cv,
            conformity_scores=inner.conformity_scores_,
            include_last_label=True,
            agg_scores="mean",
        )
        return probabilities, sets[:, :, 0]


def profile_features(data: Dataset) -> list[FeatureProfile]:
    """Per feature, what OOD checks and drift compare against: for a measurement its moments, range and deciles;
    for a category or boolean the share of each value (bins at the codes)."""
    profiles = []
    quantiles = np.linspace(0, 1, PSI_BINS + 1)[1:-1]
    for i, column in enumerate(data.schema.columns):
        values = data.X[:, i]
        present = values[~np.isnan(values)]
        if not len(present):
            raise ValueError(f"feature {column.name!r} has no values in the training data")
        if column.numeric:
            edges = np.unique(np.quantile(present, quantiles))
        else:
            n_values = len(column.values) if column.type == "category" else 2
            edges = np.arange(n_values - 1) + 0.5
        counts = np.bincount(np.searchsorted(edges, present, side="right"), minlength=len(edges) + 1)
        profiles.append(
            FeatureProfile(
                name=column.name,
                type=column.type,
                nullable=column.nullable,
                values=list(column.values),
                missing=float(1 - len(present) / len(values)),
                mean=float(present.mean()),
                std=float(present.std()),
                min=float(present.min()),
                max=float(present.max()),
                bin_edges=[float(edge) for edge in edges],
                bin_fractions=[float(count) for count in counts / len(present)],
            )
        )
    return profiles


def evaluate(
    conformal: SplitConformalRegressor | SplitConformalClassifier, levels: list[float], holdout: Dataset
) -> HoldoutMetrics | ClassificationMetrics:
    if isinstance(conformal, SplitConformalClassifier):
        return evaluate_classifier(conformal, levels, holdout)
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


def evaluate_classifier(
    conformal: SplitConformalClassifier, levels: list[float], holdout: Dataset
) -> ClassificationMetrics:
    probabilities = conformal._estimator.predict_proba(holdout.X)
    if not np.isfinite(probabilities).all():
        raise ValueError("candidate produced non-finite probabilities on the holdout")
    labels, sets = conformal.predict_set(holdout.X)
    codes = holdout.y.astype(np.intp)
    classes = list(holdout.schema.classes)
    truth = np.asarray(classes, dtype=object)[codes]
    coverage, size = {}, {}
    for index, level in enumerate(levels):
        members = sets[:, :, index]
        coverage[level_key(level)] = float(np.mean(members[np.arange(len(codes)), codes]))
        size[level_key(level)] = float(np.mean(members.sum(axis=1)))
    return ClassificationMetrics(
        accuracy=float(accuracy_score(truth, labels)),
        macro_f1=float(f1_score(truth, labels, average="macro", labels=classes, zero_division=0)),
        log_loss=float(log_loss(truth, probabilities, labels=classes)),
        coverage=coverage,
        mean_set_size=size,
    )


def train(
    development: Dataset,
    holdout: Dataset,
    *,
    estimator: str,
    levels: list[float],
    seed: int,
    n_observations: int = 0,
    user_pipeline: Any = None,
    prefit: Any = None,
) -> Predictor:
    """Fit on part of ``development``, conformalize on the rest, measure on ``holdout``. ``user_pipeline``: the
    project's own unfitted estimator; ``prefit``: a pipeline trained elsewhere (model.model_file), calibrated and
    measured here, never refitted. A classifier learns the class labels themselves (its ``classes_`` are the
    project's, in the same order), as the user's own code expects them."""
    fit, calibration = split_share(development, CALIBRATION_FRACTION, np.random.default_rng(seed + 1), minimum=10)
    for level in levels:  # split conformal needs more scores than 1/(1-level) to place the quantile at all
        needed = math.ceil(max(1 / (1 - level), 1 / level))
        if len(calibration) < needed:
            raise ValueError(
                f"{len(calibration)} calibration rows are too few for the confidence level {level:g}: it needs "
                f"{needed}, which takes about {math.ceil(needed / CALIBRATION_FRACTION / 0.8)} rows of data "
                "(or drop the level from MLAPI_CONFIDENCE_LEVELS)"
            )
    schema = development.schema
    if prefit is not None:  # trained elsewhere: only the DataFrame step in front of it (stateless, fitted here)
        model = Pipeline([("frame", frame_step(schema).fit(fit.X)), ("model", prefit)])
    else:
        model = build_pipeline(schema, estimator, seed, user_pipeline)
    if schema.task == "classification":
        missing = sorted(set(range(len(schema.classes))) - set(fit.y.astype(int).tolist()))
        if missing:
            raise ValueError(
                f"classes {[schema.classes[code] for code in missing]} have too few rows to train on: each class "
                "needs rows in the fitting, calibration and holdout shares (a few dozen or more)"
            )
        labels = np.asarray(schema.classes, dtype=object)
        if prefit is None:
            model.fit(fit.X, labels[fit.y.astype(np.intp)])
        if [str(label) for label in model.classes_] != list(schema.classes):
            raise ValueError(f"the model's classes {list(model.classes_)} are not the data's {list(schema.classes)}")
        conformal: SplitConformalRegressor | SplitConformalClassifier = SplitConformalClassifier(
            model, confidence_level=list(levels), conformity_score=CONFORMITY_SCORE, prefit=True, random_state=seed
        )  # seeded: APS randomises its calibration scores, and the same data must give the same model
        conformal.conformalize(calibration.X, labels[calibration.y.astype(np.intp)])
    else:
        if prefit is None:
            model.fit(fit.X, fit.y)
        conformal = SplitConformalRegressor(model, confidence_level=list(levels), prefit=True)
        conformal.conformalize(calibration.X, calibration.y)
    metadata = ModelMetadata(
        name=development.name,
        task=schema.task,
        classes=list(schema.classes),
        sklearn_version=sklearn.__version__,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        estimator=estimator,
        data_fingerprint=fingerprint(development.X, development.y),
        data_sha256=development.data_sha256,
        n_train=len(fit),
        n_calibration=len(calibration),
        n_holdout=len(holdout),
        holdout_split=f"time: the latest rows by {development.split_column!r}"
        if development.split_column
        else "random",
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
    # Measurements only (a category's code has no distance), and a gap is never out: NaN compares False.
    numeric = np.array([p.numeric for p in profiles], dtype=bool)
    flagged = ((low - slack > X) | (high + slack < X) | (np.abs(z) > z_threshold)) & numeric
    # Python objects only for the flagged values (a 10,000-row batch has few): row by row, features in order.
    reasons: list[list[OutOfRange]] = [[] for _ in range(len(X))]
    for row_index, feature_index in zip(*(axis.tolist() for axis in np.nonzero(flagged)), strict=True):
        profile = profiles[feature_index]
        reasons[row_index].append(
            OutOfRange(
                feature=profile.name,
                value=float(X[row_index, feature_index]),
                z_score=round(float(z[row_index, feature_index]), 3),
                train_min=profile.min,
                train_max=profile.max,
            )
        )
    return reasons


def population_stability(values: np.ndarray, profile: FeatureProfile) -> float:
    """PSI of recent ``values`` against the training deciles (a category: the value shares) of one feature (>0.25 is
    usually called drift). Gaps are left out: a window of gaps only has nothing to compare, 0."""
    values = values[~np.isnan(values)]
    if not len(values):
        return 0.0
    edges = np.asarray(profile.bin_edges)
    bins = len(edges) + 1
    expected = np.asarray(profile.bin_fractions)
    actual = np.bincount(np.searchsorted(edges, values, side="right"), minlength=bins) / max(len(values), 1)
    eps = 1e-4
    expected, actual = np.clip(expected, eps, None), np.clip(actual, eps, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))
