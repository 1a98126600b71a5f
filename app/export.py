"""The prediction log as a file for analysis: CSV or JSON lines, one row per logged prediction, with the features as
the client sent them (category names, nulls for gaps), the answer, and the ground truth that arrived for it.

Pure: logged rows and the schema in, lines out, so an export of any length streams in constant memory.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from app.predlog import LoggedPrediction
from app.tabular import Schema

if TYPE_CHECKING:
    import numpy as np

ExportFormat = Literal["csv", "jsonl"]
REGRESSION_ANSWER = ("prediction", "lower", "upper")
CLASSIFICATION_ANSWER = ("label", "probability")


def answer_columns(schema: Schema) -> tuple[str, ...]:
    """What a row says besides its features, in column order."""
    answer = CLASSIFICATION_ANSWER if schema.classes else REGRESSION_ANSWER
    return ("id", "time", "model_version", *answer, "confidence", "ood", "latency_ms", "observed")


def feature_columns(schema: Schema) -> list[str]:
    """The features' CSV headers: their own names, but ``feature:<name>`` where a name is also an answer column."""
    taken = set(answer_columns(schema))
    return [f"feature:{name}" if name in taken else name for name in schema.names]


def client_features(schema: Schema, codes: Iterable[float | None]) -> dict[str, Any]:
    """Feature codes (None or NaN for a gap) as the client sent them: category names, None for gaps."""
    return {
        column.name: column.decode(math.nan if code is None else code)
        for column, code in zip(schema.columns, codes, strict=True)
    }


def client_target(schema: Schema, code: float | None) -> Any:
    """A target code as the client sends it: a class name, or the number; None stays None."""
    if code is None:
        return None
    return schema.classes[int(code)] if schema.classes else float(code)


def as_dict(row: LoggedPrediction, schema: Schema) -> dict[str, Any]:
    """One logged prediction as the client would read it."""
    if schema.classes:
        answer: dict[str, Any] = {"label": schema.classes[int(row.prediction)], "probability": row.lower}
    else:
        answer = {"prediction": row.prediction, "lower": row.lower, "upper": row.upper}
    return {
        "id": row.id,
        "time": datetime.fromtimestamp(row.ts, UTC).isoformat(timespec="milliseconds"),
        "model_version": row.model_version,
        **answer,
        "confidence": row.confidence,
        "ood": row.ood,
        "latency_ms": round(row.latency_ms, 3),
        "observed": client_target(schema, row.observed),
        "features": client_features(schema, row.features),
    }


def export_lines(rows: Iterable[LoggedPrediction], schema: Schema, fmt: ExportFormat) -> Iterator[str]:
    """The export, a line at a time (CSV starts with its header)."""
    if fmt == "jsonl":
        for row in rows:
            yield json.dumps(as_dict(row, schema), allow_nan=False) + "\n"
        return
    answers = answer_columns(schema)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*answers, *feature_columns(schema)])
    yield buffer.getvalue()
    for row in rows:
        buffer.seek(0)
        buffer.truncate()
        record = as_dict(row, schema)
        writer.writerow([cell(record[name]) for name in answers] + [cell(v) for v in record["features"].values()])
        yield buffer.getvalue()


def cell(value: Any) -> Any:
    """CSV's spelling: an empty cell for a gap, booleans as true/false like the JSON form."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def reference_lines(name: str, schema: Schema, X: np.ndarray, y: np.ndarray) -> Iterator[str]:
    """The training data as JSON lines, for the model report (`python -m app reference`): first the schema
    (``model``, ``task``, ``classes``, ``features``: name to type), then one row per line, its features as a client
    would send them and its ``target``."""
    head = {
        "model": name,
        "task": "classification" if schema.classes else "regression",
        "classes": list(schema.classes),
        "features": {column.name: column.type for column in schema.columns},
    }
    yield json.dumps(head) + "\n"
    for codes, target in zip(X, y, strict=True):
        row = {"features": client_features(schema, codes), "target": client_target(schema, target)}
        yield json.dumps(row, allow_nan=False) + "\n"
