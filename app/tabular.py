"""The schema a model serves, and the one numeric form its rows take inside the service.

Every row travels through the service as float64 numbers, whatever the project's types: a category as the index of
its value in the declared closed set, a boolean as 0 or 1, a gap as NaN. That keeps the hot path (micro-batching, the
prediction log, the accepted ranges, the holdout, drift) one array operation however mixed the schema, and makes a
stored row mean the same forever: the declared values are part of the registry's key (app/project.py store_key).

A project's own pipeline never sees the codes. ``frame_of_codes`` is the first step in front of it: it turns the
array back into a pandas DataFrame with the declared column names and dtypes (numbers float64, integers
Int64, booleans boolean, categories strings with NaN for a gap, as ``pandas.read_csv`` gives them to the user), so a
user's own ``ColumnTransformer`` that selects columns by name works unchanged (the standard pipeline imputes and
encodes the codes themselves, by position: a DataFrame per call cost more than the model). It is a module-level
function so that skops can store it by name and the registry can trust it by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

Task = Literal["regression", "classification"]
NUMERIC_TYPES = ("number", "integer")


@dataclass(frozen=True)
class Column:
    name: str
    type: str = "number"  # number | integer | boolean | category
    nullable: bool = False
    values: tuple[str, ...] = ()  # a category's closed set, in code order

    @property
    def numeric(self) -> bool:
        return self.type in NUMERIC_TYPES

    def encode(self, value: Any) -> float:
        """One validated request value as its code (the request model has already checked type and set)."""
        if value is None:
            return np.nan
        if self.type == "category":
            return float(self.values.index(value))
        return float(value)

    def decode(self, code: float) -> Any:
        """A code back as the value a client sent (None for a gap)."""
        if np.isnan(code):
            return None
        if self.type == "category":
            return self.values[int(code)]
        if self.type == "boolean":
            return bool(code)
        if self.type == "integer":
            return int(code)
        return float(code)


@dataclass(frozen=True)
class Schema:
    columns: tuple[Column, ...]
    task: Task = "regression"
    classes: tuple[str, ...] = ()  # classification: the labels, in code order

    @classmethod
    def numbers(cls, names: Sequence[str]) -> Schema:
        """The schema of an all-number dataset without gaps (scikit-learn's diabetes data, a numeric CSV)."""
        return cls(tuple(Column(name) for name in names))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns)

    @property
    def plain(self) -> bool:
        """Numbers without gaps: the estimator can take the array as it is, no DataFrame step needed."""
        return all(column.numeric and not column.nullable for column in self.columns)

    @property
    def numeric_mask(self) -> np.ndarray:
        """Which columns hold measurements (ranges, z-scores and deciles mean something), not codes."""
        return np.array([column.numeric for column in self.columns], dtype=bool)

    @property
    def nullable_mask(self) -> np.ndarray:
        return np.array([column.nullable for column in self.columns], dtype=bool)

    def encode_frame(self, frame: pd.DataFrame) -> np.ndarray:
        """Typed data (app.project.typed) as codes, in schema order."""
        out = np.empty((len(frame), len(self.columns)), dtype=np.float64)
        for index, column in enumerate(self.columns):
            values = frame[column.name]
            if column.type == "category":
                codes = pd.Categorical(values, categories=list(column.values)).codes.astype(np.float64)
                out[:, index] = np.where(codes < 0, np.nan, codes)
            else:
                out[:, index] = values.astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
        return out

    def encode_target(self, values: Sequence[Any]) -> np.ndarray:
        """Targets as numbers: a regression's as they are, a class label as its index in ``classes``."""
        if self.task == "regression":
            return np.asarray(values, dtype=np.float64)
        index = {label: code for code, label in enumerate(self.classes)}
        return np.array([index[value] for value in values], dtype=np.float64)

    def transformer_arguments(self) -> dict[str, Any]:
        """``frame_of_codes``' keyword arguments: plain lists, which skops stores without trusting anything."""
        return {
            "columns": [column.name for column in self.columns],
            "types": [column.type for column in self.columns],
            "values": [list(column.values) for column in self.columns],
        }

    def describe(self) -> list[dict[str, Any]]:
        """The public description of each feature: its name and type, nothing measured on the data."""
        described = []
        for column in self.columns:
            item: dict[str, Any] = {"name": column.name, "type": column.type, "nullable": column.nullable}
            if column.type == "category":
                item["values"] = list(column.values)
            described.append(item)
        return described


def frame_of_codes(X: np.ndarray, columns: list[str], types: list[str], values: list[list[str]]) -> pd.DataFrame:
    """The first step of a typed project's pipeline: codes back to a DataFrame with the declared names and dtypes."""
    X = np.asarray(X, dtype=np.float64)
    data: dict[str, Any] = {}
    for index, (name, kind, allowed) in enumerate(zip(columns, types, values, strict=True)):
        codes = X[:, index]
        gaps = np.isnan(codes)
        if kind == "category":
            labels = np.asarray(allowed, dtype=object)[np.where(gaps, 0, codes).astype(np.intp)]
            labels[gaps] = np.nan
            data[name] = pd.Series(labels, dtype=object)
        elif kind == "boolean":
            data[name] = pd.Series(pd.array(np.where(gaps, 0, codes).astype(bool), dtype="boolean")).mask(gaps)
        elif kind == "integer":
            data[name] = pd.Series(pd.array(np.where(gaps, 0, codes).astype(np.int64), dtype="Int64")).mask(gaps)
        else:
            data[name] = pd.Series(codes, dtype=np.float64)
    return pd.DataFrame(data)
