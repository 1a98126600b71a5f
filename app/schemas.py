"""Request and response bodies. Feature fields are generated from the dataset, so the OpenAPI docs name them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from app.data import Dataset
from app.settings import Settings

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Interval(BaseModel):
    lower: float
    upper: float
    confidence: float


class OutOfDistributionReason(BaseModel):
    feature: str
    value: float
    z_score: float
    train_min: float
    train_max: float


class OutOfDistribution(BaseModel):
    flag: bool
    reasons: list[OutOfDistributionReason]


class PredictionResult(BaseModel):
    prediction_id: str
    prediction: float
    interval: Interval
    out_of_distribution: OutOfDistribution


class PredictResponse(PredictionResult):
    model_version: str


class BatchResponse(BaseModel):
    model_version: str
    predictions: list[PredictionResult]


class ObservationsResponse(BaseModel):
    stored: int


class RollbackRequest(BaseModel):
    model_config = STRICT
    version: str = Field(pattern=r"^v\d{4,}$", examples=["v0001"])


def field_attributes(feature_names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The Python attribute of each feature's field; the wire uses the column's own name (its alias), so any name
    the data has works: spaces, dots, '%', a leading underscore (pydantic refuses those as field names)."""
    return tuple(f"feature_{index}" for index in range(len(feature_names)))


@dataclass(frozen=True)
class RequestSchemas:
    attributes: tuple[str, ...]  # each feature's attribute on the Features model, in feature order
    features: type[BaseModel]
    predict: type[BaseModel]
    batch: type[BaseModel]
    columns: type[BaseModel]
    observations: type[BaseModel]
    ranges: AcceptedRanges


@dataclass(frozen=True)
class Bounds:
    low: float
    high: float


def accepted_bounds(values: np.ndarray, multiple: float) -> Bounds:
    """The training range widened by ``multiple`` ranges on each side (a constant column: by ``multiple``)."""
    low, high = float(np.min(values)), float(np.max(values))
    span = (high - low) or max(abs(low), 1.0)
    return Bounds(low - multiple * span, high + multiple * span)


@dataclass(frozen=True)
class AcceptedRanges:
    """What the API accepts for each feature and for a target; the same ranges judge stored observations at
    retrain time (rows from before the limits existed)."""

    features: tuple[Bounds, ...]
    target: Bounds

    @classmethod
    def of(cls, dataset: Dataset, multiple: float) -> AcceptedRanges:
        features = tuple(accepted_bounds(dataset.X[:, i], multiple) for i in range(dataset.X.shape[1]))
        return cls(features, accepted_bounds(dataset.y, multiple))

    def feature_limits(self) -> tuple[np.ndarray, np.ndarray]:
        """Each feature's lowest and highest accepted value, as arrays in feature order."""
        return np.array([bounds.low for bounds in self.features]), np.array([bounds.high for bounds in self.features])

    def admits(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per row: finite, and every feature and the target within range."""
        low, high = self.feature_limits()
        rows = np.isfinite(X).all(axis=1) & ((low <= X) & (high >= X)).all(axis=1)
        return rows & np.isfinite(y) & (y >= self.target.low) & (y <= self.target.high)


def build_request_schemas(dataset: Dataset, settings: Settings) -> RequestSchemas:
    levels = settings.confidence_levels
    feature_names = dataset.feature_names
    multiple = settings.input_range_multiple
    ranges = AcceptedRanges.of(dataset, multiple)
    feature_bounds = dict(zip(feature_names, ranges.features, strict=True))
    target_bounds = ranges.target

    def check_confidence(cls: Any, value: float) -> float:
        if value not in levels:
            raise ValueError(f"confidence must be one of {levels}")
        return value

    attributes = field_attributes(feature_names)
    features = create_model(
        "Features",
        __config__=STRICT,
        **{
            attribute: (
                float,
                Field(
                    alias=name,
                    ge=feature_bounds[name].low,
                    le=feature_bounds[name].high,
                    description=f"feature {name!r} (accepted range: the training range widened {multiple:g} times)",
                ),
            )
            for attribute, name in zip(attributes, feature_names, strict=True)
        },
    )
    confidence_field = (
        float,
        Field(settings.default_confidence, description=f"one of {levels}", json_schema_extra={"enum": levels}),
    )
    validators = {"confidence_allowed": field_validator("confidence")(check_confidence)}
    predict = create_model(
        "PredictRequest",
        __config__=STRICT,
        __validators__=validators,
        features=(features, ...),
        confidence=confidence_field,
    )
    batch = create_model(
        "BatchPredictRequest",
        __config__=STRICT,
        __validators__=validators,
        records=(
            list[features],
            Field(
                min_length=1,
                max_length=settings.max_batch_rows,
                description=f"at most {settings.max_batch_rows} records",
            ),
        ),
        confidence=confidence_field,
    )

    width = len(feature_names)
    columns = create_model(
        "ColumnsPredictRequest",
        __config__=STRICT,
        __validators__=validators,
        columns=(
            list[str],
            Field(
                min_length=width,
                max_length=width,
                description="every feature's name once, in the order of each row's values",
                examples=[list(feature_names)],
            ),
        ),
        rows=(
            list[Annotated[list[float], Field(min_length=width, max_length=width)]],
            Field(
                min_length=1,
                max_length=settings.max_batch_rows,
                description=f"at most {settings.max_batch_rows} rows of {width} numbers, in the order of columns",
            ),
        ),
        confidence=confidence_field,
    )

    def one_source(self: Any) -> Any:
        if (self.features is None) == (self.prediction_id is None):
            raise ValueError("give exactly one of 'features' or 'prediction_id'")
        return self

    observation = create_model(
        "Observation",
        __config__=STRICT,
        __validators__={"one_source": model_validator(mode="after")(one_source)},
        features=(features | None, None),
        prediction_id=(str | None, Field(None, description="id returned by /predict; its inputs are reused")),
        target=(float, Field(ge=target_bounds.low, le=target_bounds.high, description="the true value")),
    )
    observations = create_model(
        "ObservationsRequest",
        __config__=STRICT,
        observations=(list[observation], Field(min_length=1, max_length=settings.max_observations_per_call)),
    )
    return RequestSchemas(attributes, features, predict, batch, columns, observations, ranges)
