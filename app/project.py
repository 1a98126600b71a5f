"""Model projects: a directory with ``mlapi.toml``, the training data and, later, the user's own code.

``mlapi.toml`` names the model, its task and target, where the data is, and the schema of the features (declared, or
inferred from the data by ``python -m app init``). Everything here is pure but for reading the project's files: the
schema is checked against the data before anything trains or serves, and every error names the file, the key and the
fix.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import importlib
import json
import logging
import math
import re
import sys
import tempfile
import time
import tomllib
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from app.datasource import FetchError, S3Location, fetch, is_url, needs_credentials, redacted, s3_object
from app.requirements import Pin, RequirementsError, parse_pins, service_versions, to_install

log = logging.getLogger(__name__)
PROJECT_FILE = "mlapi.toml"
FeatureType = Literal["number", "integer", "boolean", "category"]
FEATURE_TYPES: tuple[str, ...] = ("number", "integer", "boolean", "category")
TRUE_WORDS = ("true", "yes", "1")
FALSE_WORDS = ("false", "no", "0")
MAX_CATEGORIES = 200  # more distinct strings than this is free text or an identifier, not a category
DEFAULT_MISSING = ("", "NA", "N/A", "NaN", "nan", "null", "NULL", "None")
SYSTEM_PACKAGES_LIST = "system-packages.txt"  # model.system_packages for the image build's system stage
SHARED_OBJECT_MISSING = re.compile(r"(\S+\.so[.\d]*): cannot open shared object file")
DEBIAN_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+")  # Debian policy 5.6.1
PARQUET_SUFFIXES = (".parquet", ".pq")
# What reads Parquet. The model image leaves it out (160 MB installed) unless the project pins it in
# model.requirements; this version is the one the tests read Parquet with (requirements.in).
PARQUET_READER = "pyarrow==26.0.1"
PARQUET_REQUIREMENTS = "requirements.txt"  # what `init` names, and writes with PARQUET_READER, for Parquet data
STRICT = ConfigDict(extra="forbid")


class ProjectError(ValueError):
    """The model project cannot be used; the message names the file, the key and the fix."""


class FeatureSpec(BaseModel):
    model_config = STRICT
    type: FeatureType
    nullable: bool = False
    values: list[str] | None = Field(None, description="the closed set of a category; inferred from the data if absent")

    @model_validator(mode="after")
    def values_only_for_categories(self) -> FeatureSpec:
        if self.values is not None:
            if self.type != "category":
                raise ValueError(f"'values' is only for type = \"category\", not {self.type!r}")
            if not self.values or len(set(self.values)) != len(self.values):
                raise ValueError("'values' must list at least one value, each once")
        return self


class SplitSpec(BaseModel):
    """How the holdout every version is judged on is drawn: random rows (seeded, stratified by class), or the latest
    rows by a time column, so a forecast is never judged on its past."""

    model_config = STRICT
    kind: Literal["random", "time"] = "random"
    column: str | None = Field(None, min_length=1, description="the time column of a time split")

    @model_validator(mode="after")
    def column_only_for_time(self) -> SplitSpec:
        if self.kind == "time" and self.column is None:
            raise ValueError('a time split names its column: split = { kind = "time", column = "<date column>" }')
        if self.kind == "random" and self.column is not None:
            raise ValueError(f'a random split has no column ({self.column!r}): did you mean kind = "time"?')
        return self


class ModelSection(BaseModel):
    model_config = STRICT
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    task: Literal["regression", "classification"]
    target: str = Field(min_length=1)
    data: str = Field(min_length=1)
    ignore: list[str] = Field(default_factory=list, description="data columns that are neither feature nor target")
    missing_values: list[str] = Field(default_factory=lambda: list(DEFAULT_MISSING))
    split: SplitSpec = Field(default_factory=SplitSpec)
    data_max_mb: float = Field(200.0, gt=0, description="data from a URL: the largest download accepted")
    data_timeout_s: float = Field(60.0, gt=0, description="data from a URL: how long one download may take")
    data_endpoint: str | None = Field(
        None, description="s3:// data from an S3-compatible store: its https endpoint (default: AWS)"
    )
    data_region: str | None = Field(
        None, pattern=r"^[a-z0-9-]{1,40}$", description="s3:// data: the bucket's region (default: boto3's own)"
    )
    pipeline: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$",
        description="module:function in the project returning an unfitted scikit-learn estimator",
    )
    trusted_types: list[str] = Field(
        default_factory=list, description="the project's own classes (module.Class) that skops may load"
    )
    requirements: str | None = Field(
        None, min_length=1, description="a requirements file in the project: extra packages for the model image"
    )
    model_file: str | None = Field(
        None, description="a fitted pipeline in skops format, in the project: served as the first version"
    )
    system_packages: list[str] = Field(
        default_factory=list,
        max_length=30,
        description="Debian packages (of the model image's release) a package needs, such as libgomp1 for LightGBM",
    )

    @field_validator("system_packages")
    @classmethod
    def debian_package_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if "=" in name:
                raise ValueError(
                    f"{name!r}: a name without a version: the model image's Debian release installs its current "
                    "(security-patched) version, and mirrors drop the old ones"
                )
            if not DEBIAN_PACKAGE.fullmatch(name):
                raise ValueError(
                    f"{name!r} is not a Debian package name (lower-case letters, digits, + - ., such as libgomp1)"
                )
        return value

    @field_validator("requirements")
    @classmethod
    def file_in_project(cls, value: str | None) -> str | None:
        if value is not None and (is_url(value) or Path(value).is_absolute() or ".." in Path(value).parts):
            raise ValueError(f"{value!r}: the requirements file must be a path inside the project")
        return value

    @field_validator("model_file")
    @classmethod
    def skops_only(cls, value: str | None) -> str | None:
        if value is not None and not value.endswith(".skops"):
            raise ValueError(
                f"{value!r}: the service loads skops files only, never pickles: convert it on your machine with "
                f"python -m app import-model {value} --project <dir>"
            )
        return value

    @field_validator("data")
    @classmethod
    def csv_file_or_https(cls, value: str) -> str:
        if is_url(value):
            scheme = value.split("://", 1)[0].lower()
            if scheme == "https":
                return value
            if scheme == "s3":
                s3_object(value)
                return value
            if scheme == "http":
                raise ValueError(f"{redacted(value)}: plain http can be changed on the way: use https")
            raise ValueError(
                f"{redacted(value)}: {scheme}:// is not fetched: use an https:// or s3:// URL (a GCS object has a "
                "presigned https URL)"
            )
        if data_format(value) is None:
            raise ValueError(
                f"{value!r}: data must be a CSV file (.csv) or a Parquet file ({', '.join(PARQUET_SUFFIXES)}) in the "
                "project, or an https:// or s3:// URL of one"
            )
        return value

    @field_validator("data_endpoint")
    @classmethod
    def https_endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urllib.parse.urlsplit(value)
            if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/") or parts.query:
                raise ValueError(
                    f"{value!r}: the S3 endpoint is an https URL with a host and nothing after it, such as "
                    "https://fsn1.your-objectstorage.com"
                )
        return value

    @model_validator(mode="after")
    def s3_keys_only_for_s3(self) -> ModelSection:
        if not needs_credentials(self.data):
            given = [key for key in ("data_endpoint", "data_region") if getattr(self, key) is not None]
            if given:
                raise ValueError(f"{' and '.join(given)} apply to s3:// data only, and model.data is {self.data_label}")
        return self

    @property
    def s3(self) -> S3Location:
        return S3Location(self.data_endpoint, self.data_region)

    @property
    def data_label(self) -> str:
        """How messages name the data: the file as written, or the URL without its credentials."""
        return redacted(self.data) if is_url(self.data) else self.data


class ProjectFile(BaseModel):
    model_config = STRICT
    model: ModelSection
    features: dict[str, FeatureSpec | FeatureType] = Field(default_factory=dict)


@dataclass(frozen=True)
class ModelProject:
    directory: Path
    model: ModelSection
    features: dict[str, FeatureSpec]  # in the data's column order; declared or inferred

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.features)

    def store_key(self) -> str:
        """Name and schema: a project whose name, task, target or features change gets a registry of its own (the old
        one's versions are kept), so a model is never served with requests of another schema."""
        schema = {
            "task": self.model.task,
            "target": self.model.target,
            "features": {name: spec.model_dump() for name, spec in self.features.items()},
        }
        if self.model.split.kind == "time":  # another holdout: versions judged on other rows start apart
            schema["split"] = self.model.split.model_dump()
        digest = hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.model.name}-{digest}"


@dataclass(frozen=True)
class ProjectData:
    """The project's data with each column in its declared type: numbers as float64 (NaN where null), integers as
    pandas' nullable Int64, booleans as the nullable boolean, categories as strings (None where null)."""

    features: pd.DataFrame
    target: pd.Series
    times: np.ndarray | None = None  # a time split's column as ordered numbers (seconds since 1970 for dates)
    sha256: str = ""  # of the data file as read (fetched, for a URL)


def _describe(error: ValidationError, where: str) -> str:
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        problems.append(f"{key}: {item['msg'].removeprefix('Value error, ')}")
    return f"{where}: " + "; ".join(problems)


def load_project(directory: Path) -> ModelProject:
    """The project in ``directory``, its schema checked against its data."""
    return open_project(directory)[0]


def read_project_file(directory: Path) -> ProjectFile:
    """``mlapi.toml`` alone, parsed and validated: what needs no data (the image build's requirements step)."""
    path = directory / PROJECT_FILE
    if not path.is_file():
        raise ProjectError(
            f"{path}: no {PROJECT_FILE} here (write one with: python -m app init <data file> --target <column>)"
        )
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProjectError(f"{path}: not valid TOML ({exc})") from None
    try:
        return ProjectFile.model_validate(raw)
    except ValidationError as exc:
        raise ProjectError(_describe(exc, str(path))) from None


def open_project(
    directory: Path, cache_dir: Path | None = None, stale_ok: bool = True
) -> tuple[ModelProject, ProjectData]:
    """The project in ``directory`` and its data, each column in its declared type. Data from a URL is fetched into
    ``cache_dir`` (a temporary directory if None); when the fetch fails and ``stale_ok``, the copy fetched last time
    is used, with a warning (a replica restarting while the data's host is down still serves)."""
    path = directory / PROJECT_FILE
    parsed = read_project_file(directory)
    pins = project_pins(directory, parsed.model)  # refused before anything is fetched or trained, as the build would
    if data_format(parsed.model.data) == "parquet" and "pyarrow" not in {pin.name for pin in pins}:
        raise ProjectError(
            f"{path}: model.data: {parsed.model.data_label} is Parquet, read with pyarrow, which the model image "
            f"carries only for a project that asks for it: add {PARQUET_READER} to the project's requirements "
            f"file (model.requirements)"
        )
    declared = {
        name: spec if isinstance(spec, FeatureSpec) else FeatureSpec(type=spec)
        for name, spec in parsed.features.items()
    }
    if is_url(parsed.model.data):
        data_path, sha256 = fetched(parsed.model, path, cache_dir, stale_ok)
        shown = label = parsed.model.data_label
    else:
        data_path, label = directory / parsed.model.data, None
        sha256 = hashlib.sha256(data_path.read_bytes()).hexdigest() if data_path.is_file() else ""
        shown = data_path.name
    frame = read_raw(data_path, parsed.model.missing_values, label)
    columns = list(frame.columns)
    if parsed.model.target not in columns:
        raise ProjectError(
            f"{path}: model.target: column {parsed.model.target!r} is not in {shown} (its columns: {columns})"
        )
    unknown_ignored = sorted(set(parsed.model.ignore) - set(columns))
    if unknown_ignored:
        raise ProjectError(f"{path}: model.ignore: {unknown_ignored} not in {shown} (its columns: {columns})")
    split_column = parsed.model.split.column
    if split_column is not None and (split_column not in columns or split_column == parsed.model.target):
        raise ProjectError(
            f"{path}: model.split.column: {split_column!r} is "
            + ("the target" if split_column == parsed.model.target else f"not in {shown} (columns: {columns})")
            + ": name the column that says when each row happened"
        )
    # A time split's column is not a feature unless declared as one: a timestamp is no input to a forecast.
    data_features = [
        c
        for c in columns
        if c != parsed.model.target and c not in parsed.model.ignore and (c != split_column or c in declared)
    ]
    if declared:
        missing = [name for name in declared if name not in columns]
        if missing:
            raise ProjectError(f"{path}: features: {missing} declared but not in {shown} (columns: {columns})")
        undeclared = [name for name in data_features if name not in declared]
        if undeclared:
            raise ProjectError(
                f"{path}: features: {shown} has columns {undeclared} that are not declared: declare each "
                "under [features] or list it in model.ignore"
            )
        features = {name: declared[name] for name in data_features}
    else:
        features = infer_schema(frame[data_features])
    project = ModelProject(directory, parsed.model, features)
    data = typed(project, frame)  # the data must fit the schema before anything trains on it
    data = replace(data, sha256=sha256)
    if split_column is None:
        return project, data
    return project, replace(data, times=times_of(list(frame[split_column]), f"{path} model.split.column", shown))


def times_of(values: list[str | None], where: str, shown: str) -> np.ndarray:
    """A time column as ordered numbers: numbers as they are (a year, an epoch), else ISO dates and times (UTC where
    no offset is given) as seconds since 1970. Every row needs one."""
    gaps = [row for row, value in enumerate(values, start=2) if value is None]
    if gaps:
        raise ProjectError(f"{where}: the time column is empty in {shown} rows {gaps[:5]}: every row needs one")
    numbers = [_as_number(value) for value in values]
    if all(number is not None for number in numbers):
        return np.array(numbers, dtype=np.float64)
    try:
        stamps = pd.to_datetime(pd.Series(values), utc=True, format="ISO8601")
    except (ValueError, TypeError) as exc:
        raise ProjectError(
            f"{where}: {shown} has a value that is neither a number nor an ISO date ({exc}): use "
            "2024-05-01 or 2024-05-01T13:00:00+02:00"
        ) from None
    return (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(dtype=np.float64)


def data_format(reference: str) -> Literal["csv", "parquet"] | None:
    """How ``model.data`` is read, from its file name or its URL's path (a URL with neither suffix is CSV)."""
    name = urllib.parse.urlsplit(reference).path if is_url(reference) else reference
    suffix = PurePosixPath(name.lower()).suffix
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "csv" if suffix == ".csv" or is_url(reference) else None


def read_raw(
    path: Path,
    missing_values: list[str] | tuple[str, ...] = DEFAULT_MISSING,
    label: str | None = None,
) -> pd.DataFrame:
    """The data as strings, None where a value is missing (a CSV cell or Parquet text holding one of
    ``missing_values``, a Parquet null or NaN): types come from the schema, not from pandas' or the file's guesses,
    so a Parquet file and the CSV of the same table give the same project. ``label``: how errors name the data (a
    URL's fetched copy is named by its URL)."""
    where = label or path
    if not path.is_file():
        raise ProjectError(f"{where}: the data file does not exist (model.data in {PROJECT_FILE})")
    if data_format(path.name) == "parquet":
        header, frame = _read_parquet(path, where, missing_values)
    else:
        try:
            with path.open(newline="") as handle:
                header = next(csv.reader(handle), [])
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=list(missing_values))
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, csv.Error) as exc:
            raise ProjectError(f"{where}: not a readable CSV file ({exc})") from None
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:  # pandas would rename them silently (name.1)
        raise ProjectError(f"{where}: column names appear more than once: {duplicated}")
    if len(frame) < 20:
        raise ProjectError(f"{where}: at least 20 rows are needed to train and judge a model, it has {len(frame)}")
    return frame.astype(object).where(frame.notna(), None)


def _read_parquet(
    path: Path, where: str | Path, missing_values: list[str] | tuple[str, ...]
) -> tuple[list[str], pd.DataFrame]:
    """The column names and the values as the text a CSV of the table would hold."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ProjectError(
            f"{where}: a Parquet file needs pyarrow, which is not installed here: pip install {PARQUET_READER}"
        ) from None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ProjectError(f"{where}: not a readable Parquet file ({exc})") from None
    missing = set(missing_values)
    columns = [[_parquet_text(value, missing) for value in column.to_pylist()] for column in table.columns]
    frame = pd.DataFrame(dict(enumerate(columns)), dtype=object)
    frame.columns = pd.Index(table.column_names, dtype=object)
    return table.column_names, frame


def _parquet_text(value: Any, missing: set[str]) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return None if value in missing else value
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    return str(value)  # int, float (its shortest round-trip form), Decimal


def fetched(model: ModelSection, path: Path, cache_dir: Path | None, stale_ok: bool) -> tuple[Path, str]:
    """The data at ``model.data`` (a URL) as a local file and its sha256: fetched now, else (``stale_ok``) the copy
    fetched last time into ``cache_dir``."""
    directory = cache_dir or Path(tempfile.gettempdir()) / "mlapi-data"
    suffix = ".parquet" if data_format(model.data) == "parquet" else ".csv"
    copy = directory / f"{hashlib.sha256(model.data.encode()).hexdigest()[:16]}{suffix}"
    try:
        sha256 = fetch(
            model.data, copy, max_bytes=int(model.data_max_mb * 2**20), timeout_s=model.data_timeout_s, s3=model.s3
        )
    except FetchError as exc:
        if not (stale_ok and copy.is_file()):
            raise ProjectError(f"{path}: model.data: {exc}") from None
        log.warning("model.data: %s; serving from the copy fetched at %s", exc, time.ctime(copy.stat().st_mtime))
        return copy, hashlib.sha256(copy.read_bytes()).hexdigest()
    return copy, sha256


def _as_number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _as_bool(value: str) -> bool | None:
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    return None


def infer_type(values: list[str]) -> FeatureSpec:
    """The narrowest type every (non-null) value of a column parses as; nullable when a value is missing."""
    present = [v for v in values if v is not None]
    nullable = len(present) < len(values)
    if not present:
        raise ProjectError("a column has no values at all")
    if all(_as_bool(v) is not None for v in present) and {v.strip().lower() for v in present} - {"0", "1"}:
        return FeatureSpec(type="boolean", nullable=nullable)
    numbers = [_as_number(v) for v in present]
    if all(n is not None for n in numbers):
        written_whole = all("." not in v and "e" not in v.lower() for v in present)  # 3.0 is a number
        if written_whole and all(float(n).is_integer() for n in numbers):
            return FeatureSpec(type="integer", nullable=nullable)
        return FeatureSpec(type="number", nullable=nullable)
    distinct = sorted(set(present))
    if len(distinct) > MAX_CATEGORIES:
        raise ProjectError(
            f"{len(distinct)} distinct text values: more than {MAX_CATEGORIES} is free text or an identifier, "
            "not a category"
        )
    return FeatureSpec(type="category", nullable=nullable, values=distinct)


def infer_schema(frame: pd.DataFrame) -> dict[str, FeatureSpec]:
    schema = {}
    for name in frame.columns:
        try:
            schema[name] = infer_type(list(frame[name]))
        except ProjectError as exc:
            raise ProjectError(f"column {name!r}: {exc} (list it in model.ignore)") from None
    return schema


def typed(project: ModelProject, frame: pd.DataFrame) -> ProjectData:
    """Each column converted to its declared type; the first value that does not fit is named with its row."""
    where = f"{project.directory / PROJECT_FILE} [features]"
    columns: dict[str, pd.Series] = {}
    for name, spec in project.features.items():
        raw = list(frame[name])
        converted: list[Any] = []
        for row, value in enumerate(raw, start=2):  # row 1 is the header
            if value is None:
                if not spec.nullable:
                    raise ProjectError(
                        f"{where}: {name!r} has an empty value in {project.model.data_label} row {row}: declare it "
                        f"{{ type = {json.dumps(spec.type)}, nullable = true }} or fill the gap"
                    )
                converted.append(None)
                continue
            parsed = _convert(value, spec)
            if parsed is None:
                allowed = f" (allowed: {spec.values})" if spec.type == "category" else ""
                raise ProjectError(
                    f"{where}: {name!r} = {value!r} in {project.model.data_label} row {row} is not a "
                    f"{spec.type}{allowed}: fix the data or the declared type"
                    + (" (add the value to 'values')" if spec.type == "category" else "")
                )
            converted.append(parsed)
        columns[name] = _series(converted, spec, name)
    return ProjectData(pd.DataFrame(columns, index=frame.index), _target(project, frame))


def _convert(value: str, spec: FeatureSpec) -> Any:
    if spec.type == "number":
        return _as_number(value)
    if spec.type == "integer":
        number = _as_number(value)
        return int(number) if number is not None and number.is_integer() else None
    if spec.type == "boolean":
        return _as_bool(value)
    if spec.values is not None and value not in spec.values:
        return None
    return value


def _series(values: list[Any], spec: FeatureSpec, name: str) -> pd.Series:
    if spec.type == "number":
        return pd.Series([np.nan if v is None else v for v in values], dtype="float64", name=name)
    if spec.type == "integer":
        return pd.Series(values, dtype="Int64", name=name)
    if spec.type == "boolean":
        return pd.Series(values, dtype="boolean", name=name)
    return pd.Series(values, dtype=object, name=name)


def _target(project: ModelProject, frame: pd.DataFrame) -> pd.Series:
    where = f"{project.directory / PROJECT_FILE} model.target"
    name = project.model.target
    values = list(frame[name])
    gaps = [row for row, value in enumerate(values, start=2) if value is None]
    if gaps:
        raise ProjectError(
            f"{where}: {name!r} is empty in {project.model.data_label} rows {gaps[:5]}: a target needs a value"
        )
    if project.model.task == "regression":
        numbers = [_as_number(v) for v in values]
        bad = [(row, v) for row, (v, n) in enumerate(zip(values, numbers, strict=True), start=2) if n is None]
        if bad:
            raise ProjectError(
                f"{where}: {name!r} = {bad[0][1]!r} in row {bad[0][0]} is not a finite number, as task = "
                '"regression" needs (or set task = "classification")'
            )
        return pd.Series(numbers, dtype="float64", name=name)
    classes = sorted(set(values))
    if len(classes) < 2:
        raise ProjectError(f"{where}: {name!r} has {len(classes)} class; classification needs at least 2")
    return pd.Series(values, dtype=object, name=name)


def render_project_file(model: ModelSection, features: dict[str, FeatureSpec]) -> str:
    """``mlapi.toml`` for ``init``: the inferred schema written out for the user to review and keep."""
    lines = [
        "# Written by `python -m app init`: review the types, then keep this file with the data.",
        "[model]",
        f"name = {json.dumps(model.name)}",
        f"task = {json.dumps(model.task)}  # or "
        + json.dumps("classification" if model.task == "regression" else "regression"),
        f"target = {json.dumps(model.target)}",
        f"data = {json.dumps(model.data)}",
    ]
    for key in ("data_endpoint", "data_region"):
        if getattr(model, key) is not None:
            lines.append(f"{key} = {json.dumps(getattr(model, key))}")
    if model.ignore:
        lines.append(f"ignore = {json.dumps(model.ignore)}")
    if model.requirements:
        lines.append(f"requirements = {json.dumps(model.requirements)}  # extra packages for the model image")
    if list(model.missing_values) != list(DEFAULT_MISSING):
        lines.append(f"missing_values = {json.dumps(model.missing_values)}")
    lines += [
        "",
        "[features]  # number, integer, boolean or category (a closed set of values); nullable = true allows gaps",
    ]
    for name, spec in features.items():
        fields = {"type": spec.type}
        if spec.nullable:
            fields["nullable"] = True
        if spec.values is not None:
            fields["values"] = spec.values
        inline = ", ".join(f"{key} = {json.dumps(value)}" for key, value in fields.items())
        lines.append(f"{json.dumps(name)} = {{ {inline} }}")
    return "\n".join(lines) + "\n"


def init_project(
    directory: Path,
    data: str | Path,
    target: str,
    task: str | None,
    name: str | None,
    ignore: list[str],
    data_endpoint: str | None = None,
    data_region: str | None = None,
) -> str:
    """The text of an ``mlapi.toml`` in ``directory`` for ``data``: a file inside it, or an https:// or s3:// URL
    (fetched once here to infer the schema, as the service fetches it; ``data_endpoint`` and ``data_region``: where
    s3:// data is served from)."""
    where = {"data_endpoint": data_endpoint, "data_region": data_region}
    given = {key: value for key, value in where.items() if value is not None}
    data = str(data)
    if is_url(data):
        try:  # validated as the project will be, and fetched with the project's limits
            probe = ModelSection(name="init", task="regression", target=target, data=data, **given)
        except ValidationError as exc:
            raise ProjectError(_describe(exc, "init")) from None
        with tempfile.TemporaryDirectory(prefix="mlapi-init-") as cache:
            copy, _ = fetched(probe, Path("init"), Path(cache), stale_ok=False)
            frame = read_raw(copy, label=probe.data_label)
        reference, shown = data, probe.data_label
    else:
        path = Path(data)
        if not path.resolve().is_relative_to(directory.resolve()):
            raise ProjectError(f"{data}: the data must be inside the project directory {directory} (copy it there)")
        reference = path.resolve().relative_to(directory.resolve()).as_posix()
        frame = read_raw(path)
        shown = path.name
    if target not in frame.columns:
        raise ProjectError(f"--target: column {target!r} is not in {shown} (its columns: {list(frame.columns)})")
    values = [v for v in frame[target] if v is not None]
    if task is None:  # a numeric target with many values is a regression; text or few values, classes
        numeric = all(_as_number(v) is not None for v in values)
        task = "regression" if numeric and len(set(values)) > 20 else "classification"
    features = [c for c in frame.columns if c != target and c not in ignore]
    default_name = "".join(c if c.isalnum() else "-" for c in directory.resolve().name.lower()).strip("-") or "model"
    try:
        model = ModelSection(
            name=name or default_name[:63], task=task, target=target, data=reference, ignore=ignore,
            requirements=PARQUET_REQUIREMENTS if data_format(reference) == "parquet" else None, **given,
        )  # fmt: skip
    except ValidationError as exc:
        raise ProjectError(_describe(exc, "init")) from None
    return render_project_file(model, infer_schema(frame[features]))


def required_methods(task: str, fitted: bool) -> tuple[str, ...]:
    """What the service calls on a project's estimator: ``fit`` on one it trains, the task's prediction method."""
    answer = ("predict", "predict_proba") if task == "classification" else ("predict",)
    return answer if fitted else ("fit", answer[-1])


def missing_methods(estimator: Any, task: str, fitted: bool) -> list[str]:
    return [method for method in required_methods(task, fitted) if not hasattr(estimator, method)]


def pipeline_factory(project: ModelProject, missing_ok: bool = False) -> Callable[[], Any] | None:
    """The project's own training code (``model.pipeline = "module:function"``), checked once: the module is a file
    in the project, the function returns an unfitted estimator with what the task needs. The project directory goes
    on the import path (at its end, so it never shadows an installed package) and stays there: skops imports the
    project's classes by name when a version is loaded. ``missing_ok`` (a check on the operator's machine): a module
    the project's requirements bring but this machine lacks is left to the image build, with a warning."""
    spec = project.model.pipeline
    if spec is None:
        return None
    where = f"{project.directory / PROJECT_FILE} model.pipeline"
    module_name, function_name = spec.split(":")
    path = project.directory.joinpath(*module_name.split(".")).with_suffix(".py")
    if not path.is_file():
        raise ProjectError(f"{where}: {path} does not exist (module:function, the module a .py file in the project)")
    directory = str(project.directory.resolve())
    if directory not in sys.path:
        sys.path.append(directory)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if project.model.requirements is None or not missing_ok:
            raise ProjectError(f"{where}: importing {path.name} failed: ModuleNotFoundError: {exc}") from None
        log.warning(
            "%s: %s is not imported here (%s): model.requirements installs it into the model image, whose build "
            "imports it and trains the first version; to serve the project on this machine, pip install -r %s",
            where, path.name, exc, project.directory / project.model.requirements,
        )  # fmt: skip
        return None
    except Exception as exc:
        raise ProjectError(f"{where}: importing {path.name} failed: {failure(exc)}") from None
    if Path(getattr(module, "__file__", "") or "").resolve() != path.resolve():
        raise ProjectError(
            f"{where}: the module name {module_name!r} is already taken by {getattr(module, '__file__', 'a builtin')}: "
            "rename the project's file"
        )
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ProjectError(f"{where}: {path.name} has no function {function_name!r}")
    try:
        estimator = function()
    except Exception as exc:
        raise ProjectError(f"{where}: {spec}() raised {type(exc).__name__}: {exc}") from None
    needs = required_methods(project.model.task, fitted=False)
    lacking = missing_methods(estimator, project.model.task, fitted=False)
    if lacking:
        raise ProjectError(
            f"{where}: {spec}() returned {type(estimator).__name__}, which has no {' or '.join(lacking)}: a "
            f"{project.model.task} needs an unfitted scikit-learn estimator with {' and '.join(needs)}"
        )
    return function


# Types skops leaves to the caller that are data, not code: a dtype argument (an encoder's, an imputer's).
DATA_TYPES: frozenset[str] = frozenset({"numpy.dtype"})
SIDECAR_SUFFIX = ".json"  # beside model.skops: the scikit-learn version it was trained with, where it came from


@dataclass(frozen=True)
class ImportedModel:
    estimator: Any
    path: Path
    sklearn_version: str  # "" when the file came without import-model's record


def other_sklearn_minor(trained_with: str) -> str | None:
    """The running scikit-learn version when a model was trained under another minor version (estimators' internals
    change between minors, so it may load and answer differently); None when they agree or nothing was recorded."""
    import sklearn  # where a model is loaded, not where a project is only read

    running = sklearn.__version__
    if trained_with and trained_with.split(".")[:2] != running.split(".")[:2]:
        return running
    return None


def imported_model(project: ModelProject) -> ImportedModel | None:
    """The fitted pipeline of ``model.model_file``, loaded with skops, only if every type in it is trusted (skops'
    own list and ``model.trusted_types``) and it was trained under this scikit-learn minor version."""
    import skops.io as sio

    if project.model.model_file is None:
        return None
    where = f"{project.directory / PROJECT_FILE} model.model_file"
    path = project.directory / project.model.model_file
    if not path.is_file():
        raise ProjectError(f"{where}: {path} does not exist (python -m app import-model <file> --project <dir>)")
    blob = path.read_bytes()
    try:
        untrusted = sorted(set(sio.get_untrusted_types(data=blob)) - DATA_TYPES - set(project.model.trusted_types))
    except Exception as exc:  # skops raises several types for a malformed archive
        raise ProjectError(f"{where}: {path.name} is not a skops file ({exc})") from None
    if untrusted:
        raise ProjectError(
            f"{where}: {path.name} holds types nobody trusted: {untrusted}; if they are the project's own, list them "
            "in model.trusted_types (their module must be in the project)"
        )
    record = path.with_name(path.name + SIDECAR_SUFFIX)
    trained_with = json.loads(record.read_text()).get("sklearn_version", "") if record.is_file() else ""
    running = other_sklearn_minor(trained_with)
    if running:
        raise ProjectError(
            f"{where}: {path.name} was trained with scikit-learn {trained_with}, this service runs {running}: retrain "
            "it under the same minor version, or give its training code as model.pipeline"
        )
    try:
        estimator = sio.loads(blob, trusted=[*DATA_TYPES, *project.model.trusted_types])
    except Exception as exc:
        raise ProjectError(f"{where}: loading {path.name} failed: {failure(exc)}") from None
    lacking = missing_methods(estimator, project.model.task, fitted=True)
    if lacking:
        raise ProjectError(f"{where}: {type(estimator).__name__} has no {' or '.join(lacking)}")
    return ImportedModel(estimator, path, trained_with)


def import_pickle(source: Path, project: ModelProject, name: str = "model.skops") -> Path:
    """Convert a joblib/pickle file (which runs code when read: only on the operator's machine) into the project's
    skops file and record the scikit-learn version beside it; ``model.model_file`` is added to mlapi.toml if absent.
    Refused, writing nothing: an object without predict, or types nobody trusted."""
    import joblib
    import sklearn
    import skops.io as sio

    directory = str(project.directory.resolve())
    if directory not in sys.path:  # the pickle may name the project's own classes, as the service will find them
        sys.path.append(directory)
    estimator = joblib.load(source)
    lacking = missing_methods(estimator, project.model.task, fitted=True)
    if lacking:
        raise ProjectError(f"{source}: a {type(estimator).__name__} has no {' or '.join(lacking)}")
    blob = sio.dumps(estimator)
    untrusted = sorted(set(sio.get_untrusted_types(data=blob)) - DATA_TYPES - set(project.model.trusted_types))
    if untrusted:
        raise ProjectError(
            f"{source}: holds types skops does not trust: {untrusted}; if they are your own classes, put their module "
            f"in the project and list them in model.trusted_types in {project.directory / PROJECT_FILE}"
        )
    target = project.directory / name
    target.write_bytes(blob)
    record = {
        "sklearn_version": sklearn.__version__,
        "imported_from": source.name,
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    target.with_name(target.name + SIDECAR_SUFFIX).write_text(json.dumps(record, indent=2) + "\n")
    if project.model.model_file != name:
        toml = project.directory / PROJECT_FILE
        text = toml.read_text()
        toml.write_text(text.replace("[model]\n", f"[model]\nmodel_file = {json.dumps(name)}\n", 1))
    return target


def failure(exc: BaseException) -> str:
    """An error of the project's code or model file, with the fix when it is a system library a package lacks."""
    text = f"{type(exc).__name__}: {exc}"
    library = SHARED_OBJECT_MISSING.search(str(exc))
    if library:
        text += (
            f" (a system library a package needs: add the Debian package that ships {library.group(1)} to "
            "model.system_packages, such as libgomp1 for libgomp.so.1)"
        )
    return text


def project_pins(directory: Path, model: ModelSection) -> list[Pin]:
    """The project's extra packages (model.requirements) still to install beside the service's, each checked."""
    if model.requirements is None:
        return []
    where = f"{directory / PROJECT_FILE} model.requirements"
    path = directory / model.requirements
    if not path.is_file():
        raise ProjectError(f"{where}: {path} does not exist (a requirements file in the project, name==version lines)")
    try:
        return to_install(parse_pins(path.read_text(), str(path)), service_versions(), where)
    except RequirementsError as exc:
        raise ProjectError(str(exc)) from None
