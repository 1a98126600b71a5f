"""The built-in estimators a service can train, by name, and the standard pipeline around them for a typed project.

Adding an estimator is one entry in ESTIMATORS: a regressor and the classifier of the same family (MLAPI_ESTIMATOR
accepts every key, and the settings' OpenAPI and error messages list them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sklearn.compose import ColumnTransformer
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

from app.tabular import Schema, frame_of_codes

GAP_CODE = -1.0  # a gap in a nullable category is a value of its own: its absence may mean something


@dataclass(frozen=True)
class Family:
    regressor: Callable[[int], Any]
    classifier: Callable[[int], Any]


ESTIMATORS: dict[str, Family] = {
    "hist_gradient_boosting": Family(
        lambda seed: HistGradientBoostingRegressor(max_iter=200, learning_rate=0.05, random_state=seed),
        lambda seed: HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, random_state=seed),
    ),
    "random_forest": Family(
        lambda seed: RandomForestRegressor(n_estimators=200, min_samples_leaf=3, random_state=seed, n_jobs=1),
        lambda seed: RandomForestClassifier(n_estimators=200, min_samples_leaf=3, random_state=seed, n_jobs=1),
    ),
    # L2-regularised linear models: best holdout RMSE on the bundled data; logistic regression's probabilities are
    # well calibrated enough for the conformal sets to stay small.
    "ridge": Family(
        lambda seed: make_pipeline(StandardScaler(), Ridge(alpha=1.0)),
        lambda seed: make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)),
    ),
}


def build_estimator(name: str, seed: int, task: str = "regression") -> Any:
    if name not in ESTIMATORS:
        raise ValueError(f"MLAPI_ESTIMATOR: unknown estimator {name!r} (one of {sorted(ESTIMATORS)})")
    family = ESTIMATORS[name]
    return (family.classifier if task == "classification" else family.regressor)(seed)


def preprocessing(schema: Schema) -> ColumnTransformer:
    """Imputation and encoding by declared type, on the service's codes (app/tabular.py) by column position: the
    standard pipeline needs no DataFrame, which cost a single-row answer more than the model (docs/benchmarks.md).
    Numbers: median, with a missing-indicator where gaps are allowed (a gap can carry signal), then scaled.
    Booleans: the most frequent value. Categories: one-hot over the declared closed set, a gap as a value of its own;
    ``handle_unknown="error"`` on purpose, since the request schema has already refused every value outside the set,
    so an unknown here would be a bug to surface, not to hide."""
    positions = {column.name: index for index, column in enumerate(schema.columns)}
    numbers = [positions[c.name] for c in schema.columns if c.numeric]
    booleans = [positions[c.name] for c in schema.columns if c.type == "boolean"]
    categories = [c for c in schema.columns if c.type == "category"]
    steps: list[tuple[str, Any, list[int]]] = []
    if numbers:
        gaps = any(c.nullable for c in schema.columns if c.numeric)
        steps.append(
            ("numbers", make_pipeline(SimpleImputer(strategy="median", add_indicator=gaps), StandardScaler()), numbers)
        )
    if booleans:
        steps.append(("booleans", SimpleImputer(strategy="most_frequent"), booleans))
    if categories:
        encoder = OneHotEncoder(
            categories=[[float(GAP_CODE), *map(float, range(len(c.values)))] for c in categories],
            handle_unknown="error",
            dtype=float,
        )
        impute = SimpleImputer(strategy="constant", fill_value=GAP_CODE)
        steps.append(("categories", make_pipeline(impute, encoder), [positions[c.name] for c in categories]))
    # Dense output always: with mostly one-hot columns the transformer would hand a sparse matrix on, which the
    # scaler in front of the linear models refuses ("Cannot center sparse matrices"); the rows served are few.
    return ColumnTransformer(steps, remainder="drop", sparse_threshold=0.0)


def frame_step(schema: Schema) -> FunctionTransformer:
    """The service's numeric rows as the DataFrame the user's pipeline expects (app/tabular.py)."""
    return FunctionTransformer(frame_of_codes, kw_args=schema.transformer_arguments())


def build_pipeline(schema: Schema, name: str, seed: int, user_pipeline: Any = None) -> Any:
    """The unfitted estimator for ``schema``: the user's own pipeline behind the DataFrame step; else the named
    estimator, as it is for plain numbers, behind the standard preprocessing for a typed project."""
    if user_pipeline is not None:
        return Pipeline([("frame", frame_step(schema)), ("model", user_pipeline)])
    if schema.plain and schema.task == "regression":
        return build_estimator(name, seed, schema.task)
    return Pipeline([("prepare", preprocessing(schema)), ("estimator", build_estimator(name, seed, schema.task))])
