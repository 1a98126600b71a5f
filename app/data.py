"""Datasets: the bundled reference data or an operator's CSV, and the fixed split every version is judged on."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.datasets import load_diabetes

from app.project import PROJECT_FILE, ProjectError, open_project
from app.settings import Settings

HOLDOUT_FRACTION = 0.2


class DatasetError(ValueError):
    """The configured dataset cannot be used; the message says why."""


@dataclass(frozen=True)
class Dataset:
    feature_names: tuple[str, ...]
    X: np.ndarray
    y: np.ndarray
    name: str = "diabetes"  # the model's name in the API
    store: str = ""  # where this data's registry and prediction log live, under the data dir ("": the data dir)

    def __post_init__(self) -> None:
        if self.X.ndim != 2 or self.X.shape[1] != len(self.feature_names):
            raise DatasetError(f"X has shape {self.X.shape}, expected (n, {len(self.feature_names)})")
        if len(self.X) != len(self.y):
            raise DatasetError(f"X has {len(self.X)} rows but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    def extend(self, X: np.ndarray, y: np.ndarray) -> Dataset:
        if len(y) == 0:
            return self
        return Dataset(self.feature_names, np.vstack([self.X, X]), np.concatenate([self.y, y]), self.name, self.store)


def fingerprint(X: np.ndarray, y: np.ndarray) -> str:
    """Content hash of a training set, so two versions can be told apart by their data."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(X, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(y, dtype=np.float64).tobytes())
    return digest.hexdigest()[:16]


def load_configured(settings: Settings) -> Dataset:
    """The data the settings choose: a model project (MLAPI_MODEL_PROJECT), else MLAPI_DATASET."""
    if settings.model_project is None:
        return load_dataset(settings.dataset, settings.target_column)
    if "dataset" in settings.model_fields_set or "target_column" in settings.model_fields_set:
        raise DatasetError(
            "MLAPI_MODEL_PROJECT names the data and the target: unset MLAPI_DATASET and MLAPI_TARGET_COLUMN"
        )
    return load_project_dataset(settings.model_project)


def load_project_dataset(directory: Path) -> Dataset:
    """A model project's data, as far as this version serves it: regression on number and integer features without
    gaps. Anything else is refused before serving, naming what the project asks for."""
    try:
        project, data = open_project(directory)
    except ProjectError as exc:
        raise DatasetError(f"MLAPI_MODEL_PROJECT: {exc}") from None
    where = f"MLAPI_MODEL_PROJECT: {directory / PROJECT_FILE}"
    if project.model.task != "regression":
        raise DatasetError(
            f"{where}: model.task = {project.model.task!r}: this version serves regression only; classification "
            "(labels, probabilities, conformal prediction sets) is not served yet"
        )
    unsupported = {n: s for n, s in project.features.items() if s.type not in ("number", "integer") or s.nullable}
    if unsupported:
        described = ", ".join(f"{n!r} ({s.type}{', nullable' if s.nullable else ''})" for n, s in unsupported.items())
        raise DatasetError(
            f"{where}: features {described}: this version serves number and integer features without gaps only"
        )
    X = data.features.to_numpy(dtype=np.float64)
    y = data.target.to_numpy(dtype=np.float64)
    return Dataset(project.feature_names, X, y, project.model.name, f"projects/{project.store_key()}")


def load_dataset(source: str, target_column: str = "target") -> Dataset:
    """``diabetes`` is scikit-learn's bundled copy (no download); anything else is a CSV path."""
    if source == "diabetes":
        bunch = load_diabetes()
        return Dataset(tuple(bunch.feature_names), bunch.data.astype(np.float64), bunch.target.astype(np.float64))
    return _load_csv(Path(source), target_column)


def _load_csv(path: Path, target_column: str) -> Dataset:
    if not path.is_file():
        raise DatasetError(f"MLAPI_DATASET: {path} is not a file (use 'diabetes' or a CSV path)")
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise DatasetError(f"MLAPI_DATASET: {path} is empty")
        if target_column not in header:
            raise DatasetError(f"MLAPI_TARGET_COLUMN: column {target_column!r} not in {path} header {header}")
        target_index = header.index(target_column)
        rows = list(reader)
    try:
        values = np.array(rows, dtype=np.float64)
    except ValueError as exc:
        raise DatasetError(f"MLAPI_DATASET: {path} has a non-numeric value ({exc})") from exc
    if values.ndim != 2 or len(values) < 20:
        raise DatasetError(f"MLAPI_DATASET: {path} needs at least 20 numeric rows, has {len(values)}")
    if not np.isfinite(values).all():
        raise DatasetError(f"MLAPI_DATASET: {path} contains NaN or infinite values")
    names = tuple(name for i, name in enumerate(header) if i != target_index)
    return Dataset(names, np.delete(values, target_index, axis=1), values[:, target_index])


def split_holdout(data: Dataset, seed: int) -> tuple[Dataset, Dataset]:
    """(development, holdout): the holdout is fixed by the seed and never used for fitting."""
    order = np.random.default_rng(seed).permutation(len(data))
    n_holdout = max(1, round(len(data) * HOLDOUT_FRACTION))
    hold, dev = order[:n_holdout], order[n_holdout:]
    return (
        Dataset(data.feature_names, data.X[dev], data.y[dev], data.name, data.store),
        Dataset(data.feature_names, data.X[hold], data.y[hold], data.name, data.store),
    )
