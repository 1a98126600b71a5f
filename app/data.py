"""Datasets: the bundled reference data or an operator's CSV, and the fixed split every version is judged on."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import load_diabetes

from app.datasource import is_url
from app.project import (
    ImportedModel,
    ModelProject,
    ProjectData,
    ProjectError,
    imported_model,
    open_project,
    pipeline_factory,
)
from app.settings import Settings
from app.tabular import Column, Schema, frame_of_codes

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
    schema: Schema = field(default=None)  # type: ignore[assignment]  # None: numbers without gaps, a regression
    pipeline: Callable[[], Any] | None = None  # the project's own training code (model.pipeline): a new estimator
    trusted_types: frozenset[str] = frozenset()  # the project's own classes skops may load (model.trusted_types)
    imported: ImportedModel | None = None  # a pipeline trained elsewhere (model.model_file): the first version
    times: np.ndarray | None = None  # a time split's order per row (model.split): the holdout is the latest rows
    split_column: str | None = None  # the column those times come from
    data_sha256: str = ""  # of the data file the rows were read from
    data_url: str | None = None  # model.data when it is a URL: fetched again at each retrain (refetched)

    def __post_init__(self) -> None:
        if self.schema is None:
            object.__setattr__(self, "schema", Schema.numbers(self.feature_names))
        if self.schema.names != tuple(self.feature_names):
            raise DatasetError(f"the schema's features {self.schema.names} are not {self.feature_names}")
        if self.X.ndim != 2 or self.X.shape[1] != len(self.feature_names):
            raise DatasetError(f"X has shape {self.X.shape}, expected (n, {len(self.feature_names)})")
        if len(self.X) != len(self.y):
            raise DatasetError(f"X has {len(self.X)} rows but y has {len(self.y)}")
        if self.times is not None and len(self.times) != len(self.y):
            raise DatasetError(f"times has {len(self.times)} rows but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    def extend(self, X: np.ndarray, y: np.ndarray) -> Dataset:
        """With ``X``, ``y`` appended: observations, which are newer than every row of the base data."""
        if len(y) == 0:
            return self
        times = None if self.times is None else np.concatenate([self.times, np.full(len(y), np.inf)])
        return replace(self, X=np.vstack([self.X, X]), y=np.concatenate([self.y, y]), times=times)

    def rows(self, index: np.ndarray) -> Dataset:
        return replace(self, X=self.X[index], y=self.y[index], times=None if self.times is None else self.times[index])


def fingerprint(X: np.ndarray, y: np.ndarray) -> str:
    """Content hash of a training set, so two versions can be told apart by their data."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(X, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(y, dtype=np.float64).tobytes())
    return digest.hexdigest()[:16]


def load_configured(settings: Settings, check_only: bool = False) -> Dataset:
    """The data the settings choose: a model project (MLAPI_MODEL_PROJECT), else MLAPI_DATASET. ``check_only``: the
    project's code may import a package its requirements bring that this machine lacks (the image build imports it)."""
    if settings.model_project is None:
        return load_dataset(settings.dataset, settings.target_column)
    if "dataset" in settings.model_fields_set or "target_column" in settings.model_fields_set:
        raise DatasetError(
            "MLAPI_MODEL_PROJECT names the data and the target: unset MLAPI_DATASET and MLAPI_TARGET_COLUMN"
        )
    return load_project_dataset(settings.model_project, data_cache(settings), check_only)


def data_cache(settings: Settings) -> Path:
    """Where data from a URL is fetched to, and read from when the next fetch at start fails."""
    return settings.data_dir / "data-cache"


def load_project_dataset(directory: Path, cache_dir: Path | None = None, check_only: bool = False) -> Dataset:
    """A model project's data in the service's numeric form (app/tabular.py), with the project's schema. A check
    (before a deploy) fetches data from a URL now or fails: a copy fetched earlier proves nothing about the stack's
    access to it."""
    try:
        project, data = open_project(directory, cache_dir, stale_ok=not check_only)
        pipeline = pipeline_factory(project, missing_ok=check_only)
        imported = imported_model(project)
    except ProjectError as exc:
        raise DatasetError(f"MLAPI_MODEL_PROJECT: {exc}") from None
    schema, X, y = _encoded(project, data)
    if imported is not None:
        check_imported(imported, schema, X, f"MLAPI_MODEL_PROJECT: {directory / 'mlapi.toml'} model.model_file")
    return Dataset(
        project.feature_names,
        X,
        y,
        project.model.name,
        f"projects/{project.store_key()}",
        schema,
        pipeline,
        frozenset(project.model.trusted_types),
        imported,
        data.times,
        project.model.split.column,
        data.sha256,
        project.model.data if is_url(project.model.data) else None,
    )


def _encoded(project: ModelProject, data: ProjectData) -> tuple[Schema, np.ndarray, np.ndarray]:
    """The project's schema (classes from the data) and its rows and target in the service's numeric form."""
    columns = tuple(
        Column(name, spec.type, spec.nullable, tuple(spec.values or ())) for name, spec in project.features.items()
    )
    classes = tuple(sorted(set(data.target))) if project.model.task == "classification" else ()
    schema = Schema(columns, project.model.task, classes)
    return schema, schema.encode_frame(data.features), schema.encode_target(list(data.target))


def refetched(dataset: Dataset, directory: Path, cache_dir: Path) -> Dataset:
    """``dataset`` with the rows its URL serves now (a retrain's step): no stale copy, and the same schema, classes
    and registry, else a DatasetError saying what changed."""
    try:
        project, data = open_project(directory, cache_dir, stale_ok=False)
    except ProjectError as exc:
        raise DatasetError(str(exc)) from None
    schema, X, y = _encoded(project, data)
    if f"projects/{project.store_key()}" != dataset.store or schema != dataset.schema:
        raise DatasetError(
            f"{project.model.data_label} now has other columns, types, values or classes than the served model was "
            f"trained on ({list(schema.names)}, classes {list(schema.classes)}): declare the schema under [features] "
            "and deploy the project again"
        )
    return replace(dataset, X=X, y=y, times=data.times, data_sha256=data.sha256)


def check_imported(imported: ImportedModel, schema: Schema, X: np.ndarray, where: str) -> None:
    """A pipeline trained elsewhere answers the project's own rows, as the service will hand them to it (the
    DataFrame with the declared names and dtypes), and knows exactly the data's classes."""
    frame = frame_of_codes(X[:5], **schema.transformer_arguments())
    try:
        imported.estimator.predict(frame)
    except Exception as exc:
        raise DatasetError(
            f"{where}: {imported.path.name} fails on the project's data: {type(exc).__name__}: {exc} (it receives a "
            "DataFrame with the columns and types of [features])"
        ) from None
    if schema.task == "classification":
        known = [str(label) for label in getattr(imported.estimator, "classes_", [])]
        if known != list(schema.classes):
            raise DatasetError(
                f"{where}: {imported.path.name} knows the classes {known}, the data has {list(schema.classes)}"
            )


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
    """(development, holdout): the holdout is fixed by the seed and never used for fitting; for a classification,
    stratified, so every class is judged in its share; with a time split, the latest rows."""
    rng = np.random.default_rng(seed)
    return split_share(data, HOLDOUT_FRACTION, rng, minimum=1)


def split_share(data: Dataset, fraction: float, rng: np.random.Generator, minimum: int) -> tuple[Dataset, Dataset]:
    """(the rest, about ``fraction`` of the rows but at least ``minimum``), drawn per class for a classification;
    with a time split, the latest rows (not per class: a forecast is judged on what came after, as it happened)."""
    if data.times is not None:
        by_time = np.argsort(data.times, kind="stable")
        n_share = min(len(data) - 1, max(minimum, round(len(data) * fraction)))
        return data.rows(by_time[:-n_share]), data.rows(by_time[-n_share:])
    order = rng.permutation(len(data))
    if data.schema.task != "classification":
        n_share = max(minimum, round(len(data) * fraction))
        return data.rows(order[n_share:]), data.rows(order[:n_share])
    shares = []
    for code in range(len(data.schema.classes)):
        members = order[data.y[order] == code]  # this class's rows, in the shuffled order
        shares.append(members[: round(len(members) * fraction)])
    share = np.concatenate(shares)
    if len(share) < minimum:
        share = np.concatenate([share, np.setdiff1d(order, share)[: minimum - len(share)]])
    rest = order[~np.isin(order, share)]
    return data.rows(rest), data.rows(share)
