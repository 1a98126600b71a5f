"""Request and response bodies. Feature fields are generated from the dataset, so the OpenAPI docs name them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from app.data import Dataset
from app.settings import Settings
from app.tabular import Column, Schema

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


class ClassificationResult(BaseModel):
    prediction_id: str
    label: str
    probabilities: dict[str, float] = Field(description="class -> probability; they sum to 1")
    prediction_set: list[str] = Field(
        description="the conformal prediction set: the labels that cannot be ruled out at the requested confidence "
        "(it holds the true label with that probability, over many requests); may be empty for an input unlike the "
        "training data"
    )
    confidence: float
    out_of_distribution: OutOfDistribution


class ClassificationResponse(ClassificationResult):
    model_version: str


class ClassificationBatchResponse(BaseModel):
    model_version: str
    predictions: list[ClassificationResult]


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
    schema: Schema

    def rows(self, records: list[Any]) -> np.ndarray:
        """Validated records as the service's numeric rows, in feature order (app/tabular.py)."""
        if self.schema.plain:
            return np.array([[getattr(r, name) for name in self.attributes] for r in records], dtype=np.float64)
        pairs = list(zip(self.schema.columns, self.attributes, strict=True))
        return np.array(
            [[column.encode(getattr(r, name)) for column, name in pairs] for r in records], dtype=np.float64
        )

    def target(self, value: Any) -> float:
        """A validated target as its number: a class label as its index."""
        return float(self.schema.encode_target([value])[0])


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
    nullable: tuple[bool, ...] = ()

    @classmethod
    def of(cls, dataset: Dataset, multiple: float) -> AcceptedRanges:
        """Measurements: the widened training range. Categories and booleans: their codes."""
        features = []
        for index, column in enumerate(dataset.schema.columns):
            if column.numeric:
                values = dataset.X[:, index]
                features.append(accepted_bounds(values[~np.isnan(values)], multiple))
            else:
                features.append(Bounds(0.0, float(len(column.values) - 1 if column.type == "category" else 1)))
        if dataset.schema.task == "classification":
            target = Bounds(0.0, float(len(dataset.schema.classes) - 1))
        else:
            target = accepted_bounds(dataset.y, multiple)
        return cls(tuple(features), target, tuple(column.nullable for column in dataset.schema.columns))

    def feature_limits(self) -> tuple[np.ndarray, np.ndarray]:
        """Each feature's lowest and highest accepted value, as arrays in feature order."""
        return np.array([bounds.low for bounds in self.features]), np.array([bounds.high for bounds in self.features])

    def admits(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per row: finite, and every feature and the target within range."""
        low, high = self.feature_limits()
        gap_allowed = np.isnan(X) & np.array(self.nullable or [False] * X.shape[1], dtype=bool)
        rows = (((low <= X) & (high >= X)) | gap_allowed).all(axis=1)
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
    examples = dict(zip(feature_names, example_values(dataset), strict=True))
    features = create_model(
        "Features",
        __config__=STRICT,
        **{
            attribute: feature_field(column, feature_bounds[column.name], multiple, examples[column.name])
            for attribute, column in zip(attributes, dataset.schema.columns, strict=True)
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
    row_type = list[float] if dataset.schema.plain else list[Any]
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
            # Numbers only: parsed straight into one array. A typed schema: each row checked as a record would be.
            list[Annotated[row_type, Field(min_length=width, max_length=width)]],  # type: ignore[valid-type]
            Field(
                min_length=1,
                max_length=settings.max_batch_rows,
                description=f"at most {settings.max_batch_rows} rows of {width} values, in the order of columns",
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
        target=target_field(dataset.schema, target_bounds),
    )
    observations = create_model(
        "ObservationsRequest",
        __config__=STRICT,
        observations=(list[observation], Field(min_length=1, max_length=settings.max_observations_per_call)),
    )
    return RequestSchemas(attributes, features, predict, batch, columns, observations, ranges, dataset.schema)


def feature_field(column: Column, bounds: Bounds, multiple: float, example: Any) -> tuple[Any, Any]:
    """A feature's request field: its type, its accepted values, null only where the project allows gaps. The alias
    is the column's own name, so the wire uses it whatever characters it has."""
    gap = " or null" if column.nullable else ""
    annotation: Any
    if column.type == "category":
        annotation = Literal[column.values]  # type: ignore[valid-type]
        field = Field(alias=column.name, description=f"feature {column.name!r}: one of {list(column.values)}{gap}")
    elif column.type == "boolean":
        annotation = bool
        field = Field(alias=column.name, description=f"feature {column.name!r}: true or false{gap}")
    else:
        annotation = int if column.type == "integer" else float
        low, high = bounds.low, bounds.high
        if column.type == "integer":
            low, high = int(np.ceil(low)), int(np.floor(high))
        field = Field(
            alias=column.name,
            ge=low,
            le=high,
            description=f"feature {column.name!r}: {'a whole number' if column.type == 'integer' else 'a number'}"
            f"{gap} (accepted range: the training range widened {multiple:g} times)",
        )
    field.examples = [example]
    return (annotation | None if column.nullable else annotation), field


def example_values(dataset: Dataset) -> list[Any]:
    """An example per feature for the OpenAPI page, from the data: the first row without gaps (else the first)."""
    complete = np.flatnonzero(~np.isnan(dataset.X).any(axis=1))
    row = dataset.X[complete[0] if len(complete) else 0]
    return [column.decode(code) for column, code in zip(dataset.schema.columns, row, strict=True)]


def target_field(schema: Schema, bounds: Bounds) -> tuple[Any, Any]:
    if schema.task == "classification":
        return Literal[schema.classes], Field(description=f"the true label: one of {list(schema.classes)}")  # type: ignore[valid-type]
    return float, Field(ge=bounds.low, le=bounds.high, description="the true value")
