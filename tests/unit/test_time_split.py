"""A time split (``split = { kind = "time", column = "..." }``): the holdout every version is judged on is the latest
rows, whatever order the file has, so a forecast is never judged on its past; the time column is no feature; each
misuse names the key."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.data import Dataset, load_project_dataset, split_holdout
from app.project import PROJECT_FILE, ProjectError, load_project
from app.registry import Registry
from tests.support.service import admin_headers

PROJECT_DIR = Path(__file__).resolve().parents[2]
N_ROWS = 200
START = datetime(2024, 1, 1, tzinfo=UTC)
PROJECT = """[model]
name = "demand"
task = "regression"
target = "demand"
data = "data/demand.csv"
split = {{ kind = "time", column = "{column}" }}
"""


def demand_project(directory: Path, column: str = "day", dates: list[str] | None = None) -> Path:
    """Hourly demand that grows over time, written in a shuffled row order: only the dates tell what came last."""
    rng = np.random.default_rng(7)
    days = dates or [(START + timedelta(days=i)).date().isoformat() for i in range(N_ROWS)]
    rows = [
        [days[i], round(20 + 0.1 * i + rng.normal(), 3), round(100 + 3 * i + rng.normal(), 3)] for i in range(N_ROWS)
    ]
    (directory / "data").mkdir(parents=True)
    with (directory / "data" / "demand.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["day", "temperature", "demand"])
        writer.writerows(rows[i] for i in rng.permutation(N_ROWS))
    (directory / PROJECT_FILE).write_text(PROJECT.format(column=column))
    return directory


def test_the_holdout_is_the_latest_rows_and_the_time_column_is_no_feature(tmp_path: Path) -> None:
    dataset = load_project_dataset(demand_project(tmp_path / "demand"))
    assert dataset.feature_names == ("temperature",)
    development, holdout = split_holdout(dataset, seed=1)
    assert len(holdout) == 40
    assert holdout.times.min() > development.times.max()  # everything judged on came after everything trained on
    latest = np.sort(dataset.times)[-40:]
    assert np.array_equal(np.sort(holdout.times), latest)
    assert np.array_equal(split_holdout(dataset, seed=2)[1].X, holdout.X)  # the seed plays no part


def test_the_calibration_share_is_the_latest_of_the_rest_and_observations_are_newest() -> None:
    times = np.arange(10.0)[::-1]
    data = Dataset(("x",), np.arange(10.0).reshape(-1, 1), np.arange(10.0), times=times, split_column="t")
    grown = data.extend(np.array([[99.0]]), np.array([99.0]))
    rest, share = split_holdout(grown, seed=0)
    assert share.y.tolist() == [0.0, 99.0]  # the latest row (time 9), then the observation (newest)
    assert rest.times.max() < share.times.min()


def test_a_served_forecast_says_how_it_was_judged(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    directory = demand_project(tmp_path / "demand")
    service = make_client(model_project=directory)
    card = service.get("/model").json()
    assert card["holdout_split"] == "time: the latest rows by 'day'"
    assert [feature["name"] for feature in card["features"]] == ["temperature"]
    assert service.post("/predict", json={"features": {"temperature": 30.0}}).status_code == 200
    (store,) = (tmp_path / "data" / "projects").iterdir()
    dataset = load_project_dataset(directory)
    latest = dataset.X[np.argsort(dataset.times)[-40:]]
    with np.load(store / "holdout.npz") as stored:  # the registry's fixed holdout: the last 40 days
        assert np.array_equal(np.sort(stored["X"], axis=0), np.sort(latest, axis=0))
    outcome = service.post("/admin/retrain", headers=admin_headers()).json()
    assert outcome["outcome"] in ("rejected", "promoted"), outcome
    assert Registry(store).current() is not None


def test_a_time_split_is_a_registry_of_its_own(tmp_path: Path) -> None:
    directory = demand_project(tmp_path / "demand")
    timed = load_project(directory).store_key()
    text = (directory / PROJECT_FILE).read_text()
    (directory / PROJECT_FILE).write_text(
        text.replace('split = { kind = "time", column = "day" }\n', 'ignore = ["day"]\n')
    )
    assert load_project(directory).store_key() != timed


def test_epoch_numbers_and_offsets_order_rows_too(tmp_path: Path) -> None:
    epochs = [str(1_700_000_000 + 3600 * i) for i in range(N_ROWS)]
    assert np.array_equal(
        np.sort(load_project_dataset(demand_project(tmp_path / "a", dates=epochs)).times),
        np.sort([float(e) for e in epochs]),
    )
    stamps = [(START + timedelta(hours=i)).isoformat() for i in range(N_ROWS)]
    stamps[5] = "2024-01-01T07:30:00+02:00"  # 05:30 UTC: between rows 5 and 6 in time
    times = load_project_dataset(demand_project(tmp_path / "b", dates=stamps)).times
    in_utc = START.timestamp() + 5.5 * 3600
    assert sorted(times).index(in_utc) == 5  # after 05:00Z, before 06:00Z


@pytest.mark.parametrize(
    ("toml", "dates", "says"),
    [
        ('split = { kind = "time", column = "when" }', None, "model.split.column: 'when' is not in demand.csv"),
        ('split = { kind = "time", column = "demand" }', None, "model.split.column: 'demand' is the target"),
        ('split = { kind = "time" }', None, "model.split: a time split names its column"),
        ('split = { kind = "random", column = "day" }', None, "a random split has no column ('day')"),
        (
            'split = { kind = "time", column = "day" }',
            ["soon", *["2024-01-01"] * (N_ROWS - 1)],
            "neither a number nor an ISO date",
        ),
        (
            'split = { kind = "time", column = "day" }',
            ["", *["2024-01-01"] * (N_ROWS - 1)],
            "the time column is empty in demand.csv rows",
        ),
    ],
)
def test_a_bad_split_names_the_key_and_the_fix(tmp_path: Path, toml: str, dates: list[str] | None, says: str) -> None:
    directory = demand_project(tmp_path / "demand", dates=dates)
    text = (directory / PROJECT_FILE).read_text()
    (directory / PROJECT_FILE).write_text(text.replace('split = { kind = "time", column = "day" }', toml))
    with pytest.raises(ProjectError) as refused:
        load_project(directory)
    assert says in str(refused.value) and PROJECT_FILE in str(refused.value), str(refused.value)


def test_the_penguins_example_may_hold_out_its_latest_year(tmp_path: Path) -> None:
    directory = tmp_path / "penguins"
    shutil.copytree(PROJECT_DIR / "examples" / "penguins", directory)
    text = (directory / PROJECT_FILE).read_text()
    (directory / PROJECT_FILE).write_text(
        text.replace(
            'data = "data/penguins.csv"\n', 'data = "data/penguins.csv"\nsplit = { kind = "time", column = "year" }\n'
        )
    )
    dataset = load_project_dataset(directory)
    assert "year" in dataset.feature_names  # declared, so it stays a feature as well
    development, holdout = split_holdout(dataset, seed=0)
    assert set(holdout.times) >= {2009.0} and development.times.max() <= holdout.times.min()
