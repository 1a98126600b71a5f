"""The columnar form of a batch: ``{"columns": [names...], "rows": [[numbers...], ...], "confidence": 0.9}``.

Parsed by pydantic-core straight from the body's bytes (no Python JSON objects, no model per row) into one NumPy
array; the accepted ranges are then checked for the whole array at once. Same rules and error shapes as the record
form: a value outside its feature's range is a 422 that names the row and the column. A typed project's rows (text,
booleans, gaps) are checked row by row with the record form's model instead, then encoded (app/tabular.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from app.limits import MAX_ERRORS, too_many_errors
from app.schemas import AcceptedRanges, RequestSchemas


def parse_columns(body: bytes, schemas: RequestSchemas) -> tuple[np.ndarray, float]:
    """The rows as an array in the model's feature order, and the confidence; RequestValidationError otherwise."""
    feature_names, ranges = schemas.schema.names, schemas.ranges
    try:
        request = schemas.columns.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        ) from None
    columns: list[str] = request.columns  # type: ignore[attr-defined]
    if sorted(columns) != sorted(feature_names):
        missing = sorted(set(feature_names) - set(columns))
        unknown = sorted(set(columns) - set(feature_names))
        repeated = sorted({name for name in columns if columns.count(name) > 1})
        problems = [
            f"{what}: {names}"
            for what, names in (("missing", missing), ("unknown", unknown), ("repeated", repeated))
            if names
        ]
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("body", "columns"),
                    "msg": f"columns must name each of {list(feature_names)} once ({'; '.join(problems)})",
                }
            ]
        )
    request_columns = [columns.index(name) for name in feature_names]  # where each feature is in a row as sent
    if not schemas.schema.plain:
        return typed_rows(request.rows, columns, schemas.features, schemas), request.confidence  # type: ignore[attr-defined]
    X = np.array(request.rows, dtype=np.float64)[:, request_columns]  # type: ignore[attr-defined]
    errors = out_of_range(X, feature_names, ranges, request_columns)
    if errors:
        raise RequestValidationError(errors)
    return X, request.confidence  # type: ignore[attr-defined]


def out_of_range(
    values: np.ndarray, feature_names: Sequence[str], ranges: AcceptedRanges, request_columns: list[int]
) -> list[dict[str, Any]]:
    """Errors for values outside their feature's accepted range, as the record form words them: the first
    MAX_ERRORS by row then column (as the request orders them), and how many more there are."""
    low, high = ranges.feature_limits()
    too_low, too_high = values < low, values > high
    rows, features = np.nonzero(too_low | too_high)
    order = np.lexsort((np.array(request_columns)[features], rows)) if len(rows) else []
    errors = []
    for index in list(order)[:MAX_ERRORS]:
        row, feature = int(rows[index]), int(features[index])
        below = bool(too_low[row, feature])
        limit = float(low[feature] if below else high[feature])
        errors.append(
            {
                "type": "greater_than_equal" if below else "less_than_equal",
                "loc": ("body", "rows", row, request_columns[feature]),
                "msg": f"Input should be {'greater' if below else 'less'} than or equal to {limit} "
                f"({feature_names[feature]!r})",
                "ctx": {"ge" if below else "le": limit},
            }
        )
    if len(rows) > MAX_ERRORS:
        errors.append(too_many_errors(len(rows) - MAX_ERRORS))
    return errors


def typed_rows(
    rows: list[list[Any]], columns: list[str], features: type[BaseModel], schemas: RequestSchemas
) -> np.ndarray:
    """Each row validated as the record form's ``features`` object, errors located at the row and the column."""
    records, errors, more = [], [], 0
    for index, row in enumerate(rows):
        try:
            records.append(features.model_validate(dict(zip(columns, row, strict=True))))
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                if len(errors) >= MAX_ERRORS:
                    more += 1
                    continue
                name = error["loc"][0] if error["loc"] else None
                where = columns.index(name) if name in columns else None
                located = ("body", "rows", index) if where is None else ("body", "rows", index, where)
                errors.append({**error, "loc": located})
    if more:
        errors.append(too_many_errors(more))
    if errors:
        raise RequestValidationError(errors)
    return schemas.rows(records)
