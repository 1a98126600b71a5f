"""The standard pipeline of a typed project (app/estimators.py: imputation and one-hot encoding in a
``ColumnTransformer``, then a scaler and a linear model) as a few array operations on the fitted parameters.

For one row, scikit-learn spends ~1.3 ms in that pipeline, nearly all of it in per-call machinery (input validation,
output containers, joblib's sequential dispatch), against ~20 µs for the arithmetic. A compiled pipeline is only
ever served after it gave scikit-learn's own answers, to 1e-9, on rows that cover every column's gap and every
category's value (``Predictor`` checks it when a version is swapped in); any other pipeline, estimator or parameter
that is not understood here is left to scikit-learn (``compile_pipeline`` returns None).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.special import expit
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.utils.extmath import softmax

Step = Callable[[np.ndarray], np.ndarray]


class UnknownCategory(ValueError):
    """A code outside an encoder's categories: scikit-learn raises there, so the caller asks it for its error."""


def compile_pipeline(pipeline: object) -> Step | None:
    """The fitted ``pipeline``'s ``predict_proba`` (a classifier) or ``predict`` (a regressor) on the service's codes,
    or None when any part of it is not one this module knows."""
    if not isinstance(pipeline, Pipeline) or len(pipeline.steps) != 2:
        return None
    prepare = _column_transformer(pipeline.steps[0][1])
    estimator = pipeline.steps[1][1]
    if prepare is None or not isinstance(estimator, Pipeline):
        return None
    parts = [_step(step) for _, step in estimator.steps[:-1]]
    final = _linear(estimator.steps[-1][1])
    if final is None or any(part is None for part in parts):
        return None
    return _chain([prepare, *parts, final])  # type: ignore[list-item]


def _chain(steps: list[Step]) -> Step:
    def run(X: np.ndarray) -> np.ndarray:
        for step in steps:
            X = step(X)
        return X

    return run


def _column_transformer(transformer: object) -> Step | None:
    if not isinstance(transformer, ColumnTransformer) or transformer.sparse_output_:
        return None
    parts: list[tuple[Step, np.ndarray]] = []
    for name, fitted, columns in transformer.transformers_:
        if fitted == "drop" or (name == "remainder" and len(columns) == 0):
            continue
        step = _step(fitted)
        positions = np.asarray(columns)
        if step is None or positions.dtype.kind not in "iu":
            return None
        parts.append((step, positions))

    def transform(X: np.ndarray) -> np.ndarray:
        return np.hstack([step(X[:, positions]) for step, positions in parts])

    return transform


def _step(step: object) -> Step | None:
    """One fitted transformer of the standard pipeline, or a pipeline of them."""
    if isinstance(step, Pipeline):
        parts = [_step(part) for _, part in step.steps]
        return None if any(part is None for part in parts) else _chain(parts)  # type: ignore[arg-type]
    if isinstance(step, SimpleImputer):
        return _imputer(step)
    if isinstance(step, StandardScaler):
        mean = step.mean_ if step.with_mean else None
        scale = step.scale_ if step.with_std else None
        return lambda X: ((X - mean) if mean is not None else X) / (scale if scale is not None else 1.0)
    if isinstance(step, OneHotEncoder):
        return _one_hot(step)
    return None


def _imputer(imputer: SimpleImputer) -> Step | None:
    statistics = np.asarray(imputer.statistics_, dtype=float)
    missing = imputer.missing_values
    if not (isinstance(missing, float) and np.isnan(missing)) or np.isnan(statistics).any():
        return None  # another missing marker, or a column dropped for having no values at all
    indicator = imputer.indicator_.features_ if imputer.add_indicator else None

    def impute(X: np.ndarray) -> np.ndarray:
        gaps = np.isnan(X)
        filled = np.where(gaps, statistics, X)
        if indicator is None:
            return filled
        return np.hstack([filled, gaps[:, indicator].astype(float)])

    return impute


def _one_hot(encoder: OneHotEncoder) -> Step | None:
    if encoder.drop_idx_ is not None or getattr(encoder, "_infrequent_enabled", False):
        return None
    if encoder.handle_unknown != "error" or encoder.dtype not in (float, np.float64):
        return None
    categories = [np.asarray(values, dtype=float) for values in encoder.categories_]

    def encode(X: np.ndarray) -> np.ndarray:
        blocks = [X[:, [j]] == values[None, :] for j, values in enumerate(categories)]
        matched = np.hstack(blocks)
        if matched.sum() != X.shape[0] * len(categories):
            raise UnknownCategory("a code outside the encoder's categories")
        return matched.astype(float)

    return encode


def _linear(model: object) -> Step | None:
    if isinstance(model, LogisticRegression):
        coef, intercept = model.coef_, model.intercept_
        if len(model.classes_) == 2:  # scikit-learn's binary form: one decision, a logistic, two columns

            def binary(X: np.ndarray) -> np.ndarray:
                positive = expit(X @ coef[0] + intercept[0])
                return np.column_stack([1.0 - positive, positive])

            return binary
        return lambda X: softmax(X @ coef.T + intercept, copy=False)
    if isinstance(model, Ridge) and model.coef_.ndim == 1:
        coef, intercept = model.coef_, model.intercept_
        return lambda X: X @ coef + intercept
    return None


def covering_rows(probes: np.ndarray, gaps: np.ndarray, category_sizes: dict[int, int]) -> np.ndarray:
    """Rows to hold a compiled pipeline against scikit-learn: ``probes`` (valid rows over the training range), each
    again with every nullable column a gap, and with every category column (position → number of values) at each of
    its codes."""
    rows = [probes]
    with_gaps = probes.copy()
    with_gaps[:, gaps] = np.nan
    rows.append(with_gaps)
    for code in range(max(category_sizes.values(), default=0)):
        varied = probes.copy()
        for position, size in category_sizes.items():
            varied[:, position] = min(code, size - 1)
        rows.append(varied)
    return np.vstack(rows)
