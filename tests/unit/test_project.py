"""Model projects: mlapi.toml, the schema inferred or declared and checked against the data, errors that name the file,
the key and the fix, a registry per project and schema, and what GET /model may show."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sklearn.datasets import load_diabetes

from app.data import DatasetError, fingerprint, load_dataset, load_project_dataset
from app.project import PROJECT_FILE, ProjectError, init_project, load_project, open_project
from tests.support.service import ADMIN_TOKEN, FEATURES, admin_headers, record

PROJECT_DIR = Path(__file__).resolve().parents[2]
EXAMPLES = PROJECT_DIR / "examples"


def copy_example(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(EXAMPLES / name, target)
    return target


def write_project(directory: Path, toml: str, header: list[str], rows: list[list[object]]) -> Path:
    (directory / "data").mkdir(parents=True, exist_ok=True)
    with (directory / "data" / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    (directory / PROJECT_FILE).write_text(toml)
    return directory


def diabetes_rows(renamed: dict[str, str] | None = None) -> tuple[list[str], list[list[object]]]:
    data = load_diabetes()
    header = [(renamed or {}).get(name, name) for name in FEATURES] + ["target"]
    return header, [[*row.tolist(), float(target)] for row, target in zip(data.data, data.target, strict=True)]


REGRESSION = '[model]\nname = "{name}"\ntask = "regression"\ntarget = "target"\ndata = "data/train.csv"\n'
DECLARED = "[features]\n" + "".join(f'{name} = "number"\n' for name in FEATURES)


# -- the examples ---------------------------------------------------------------------------------------------------
def test_the_examples_mlapi_toml_are_what_init_infers_from_their_data(tmp_path: Path) -> None:
    for name, target in (("penguins", "species"), ("diabetes", "target")):
        example = EXAMPLES / name
        inferred = init_project(example, example / "data" / f"{name}.csv", target, None, None, [])
        assert inferred == (example / PROJECT_FILE).read_text(), name


def test_penguins_schema_has_categories_gaps_and_integers() -> None:
    project, data = open_project(EXAMPLES / "penguins")
    assert project.model.task == "classification"
    features = project.features
    assert features["island"].type == "category" and features["island"].values == ["Biscoe", "Dream", "Torgersen"]
    assert features["sex"].nullable and features["sex"].values == ["female", "male"]
    assert features["bill_length_mm"].type == "number" and features["bill_length_mm"].nullable
    assert features["year"].type == "integer" and not features["year"].nullable
    assert data.features["bill_length_mm"].isna().sum() == 2  # 'NA' in the published file
    assert str(data.features["year"].dtype) == "Int64"
    assert sorted(set(data.target)) == ["Adelie", "Chinstrap", "Gentoo"]


def test_the_diabetes_project_is_the_bundled_data() -> None:
    bundled, project = load_dataset("diabetes"), load_project_dataset(EXAMPLES / "diabetes")
    assert project.feature_names == bundled.feature_names
    assert fingerprint(project.X, project.y) == fingerprint(bundled.X, bundled.y)
    assert project.name == "diabetes" and project.store.startswith("projects/diabetes-")


# -- errors name the file, the key and the fix ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("toml_tail", "rows_change", "says"),
    [
        ('target = "price"\n', None, "model.target: column 'price' is not in train.csv"),
        ('[features]\nage = "number"\n', None, "train.csv has columns ['sex', 'bmi'"),  # undeclared columns
        (DECLARED, lambda rows: rows[3].__setitem__(2, "heavy"), "'bmi' = 'heavy' in data/train.csv row 5 is not a"),
        (DECLARED, lambda rows: rows[0].__setitem__(0, ""), "'age' has an empty value in data/train.csv row 2"),
        ('ignore = ["nope"]\n', None, "model.ignore: ['nope'] not in train.csv"),
    ],
)
def test_an_inconsistent_project_is_refused_naming_file_key_and_row(
    tmp_path: Path, toml_tail: str, rows_change: Callable | None, says: str
) -> None:
    header, rows = diabetes_rows()
    if rows_change:
        rows_change(rows)
    toml = REGRESSION.format(name="odd")
    if toml_tail.startswith("target"):
        toml = toml.replace('target = "target"\n', toml_tail)
    else:
        toml += toml_tail
    directory = write_project(tmp_path / "p", toml, header, rows)
    with pytest.raises(ProjectError) as refused:
        load_project(directory)
    assert str(directory / PROJECT_FILE) in str(refused.value) and says in str(refused.value), str(refused.value)


def test_a_category_outside_its_declared_values_names_the_allowed_ones(tmp_path: Path) -> None:
    directory = copy_example("penguins", tmp_path)
    toml = (
        (directory / PROJECT_FILE)
        .read_text()
        .replace('values = ["Biscoe", "Dream", "Torgersen"]', 'values = ["Dream"]')
    )
    (directory / PROJECT_FILE).write_text(toml)
    with pytest.raises(ProjectError, match=r"'island' = 'Torgersen' .* is not a category \(allowed: \['Dream'\]\)"):
        load_project(directory)


@pytest.mark.parametrize(
    ("replace", "says"),
    [
        (
            ('task = "classification"', 'task = "ranking"'),
            "model.task: Input should be 'regression' or 'classification'",
        ),
        (
            ('data = "data/penguins.csv"', 'data = "http://example.org/p.csv"'),
            "model.data: http://example.org/p.csv: plain",
        ),
        (('name = "penguins"', 'name = "Penguins!"'), "model.name: String should match pattern"),
        (('"year" = { type = "integer" }', '"year" = { type = "date" }'), "features.year"),
        (("[model]", '[model]\nmodel_fil = "x.skops"'), "model.model_fil: Extra inputs are not permitted"),
        (("[model]", '[model]\nmodel_file = "x.joblib"'), "model.model_file: 'x.joblib': the service loads skops"),
        (
            ("[model]", '[model]\nrequirements = "../r.txt"'),
            "model.requirements: '../r.txt': the requirements file must",
        ),
    ],
)
def test_a_bad_project_file_names_the_key(tmp_path: Path, replace: tuple[str, str], says: str) -> None:
    directory = copy_example("penguins", tmp_path)
    text = (directory / PROJECT_FILE).read_text()
    assert replace[0] in text
    (directory / PROJECT_FILE).write_text(text.replace(replace[0], replace[1]))
    with pytest.raises(ProjectError) as refused:
        load_project(directory)
    assert says in str(refused.value) and PROJECT_FILE in str(refused.value), str(refused.value)


def test_a_directory_without_a_project_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ProjectError, match=r"no mlapi.toml here \(write one with: python -m app init"):
        load_project(tmp_path)


def test_serving_an_inconsistent_project_stops_before_serving(tmp_path: Path) -> None:
    directory = copy_example("penguins", tmp_path)
    text = (directory / PROJECT_FILE).read_text()
    gap_refused = text.replace('"category", nullable = true, values = ["female"', '"category", values = ["female"')
    (directory / PROJECT_FILE).write_text(gap_refused)
    result = subprocess.run(
        [sys.executable, "-m", "app", "serve"],
        env={"MLAPI_MODEL_PROJECT": str(directory), "MLAPI_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin"},
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert f"{directory / PROJECT_FILE} [features]: 'sex' has an empty value in data/penguins.csv row" in result.stderr
    assert "nullable = true" in result.stderr and "Traceback" not in result.stderr


def test_init_writes_the_file_once(tmp_path: Path) -> None:
    directory = copy_example("penguins", tmp_path)
    (directory / PROJECT_FILE).unlink()
    command = [sys.executable, "-m", "app", "init", str(directory / "data" / "penguins.csv")]
    first = subprocess.run([*command, "--project", str(directory), "--target", "species"], cwd=PROJECT_DIR,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert (directory / PROJECT_FILE).read_text() == (EXAMPLES / "penguins" / PROJECT_FILE).read_text()
    again = subprocess.run([*command, "--project", str(directory), "--target", "species"], cwd=PROJECT_DIR,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 1 and "exists; nothing written" in again.stderr


# -- serving a project ----------------------------------------------------------------------------------------------
def test_any_column_name_works_on_the_wire(make_client, tmp_path: Path) -> None:
    odd = {"age": "age (years)", "sex": "_sex", "bmi": "bmi %", "bp": "blood.pressure"}
    header, rows = diabetes_rows(odd)
    directory = write_project(tmp_path / "odd", REGRESSION.format(name="odd-names"), header, rows)
    client = make_client(model_project=directory)
    features = {odd.get(name, name): value for name, value in record().items()}
    answer = client.post("/predict", json={"features": features})
    assert answer.status_code == 200, answer.text
    schema = client.get("/openapi.json").json()["components"]["schemas"]["Features"]
    assert set(schema["properties"]) == set(header[:-1]) and "_sex" in schema["required"]
    wrong = client.post("/predict", json={"features": {**features, "bmi %": "fat"}})
    assert wrong.status_code == 422 and "bmi %" in wrong.text
    batch = client.post("/predict/columns", json={"columns": header[:-1], "rows": [list(features.values())]})
    assert batch.status_code == 200 and batch.json()["predictions"][0]["prediction"] == answer.json()["prediction"]
    assert client.get("/model").json()["name"] == "odd-names"


def test_a_csv_column_with_a_leading_underscore_no_longer_crashes_start_up(make_client, tmp_path: Path) -> None:
    header, rows = diabetes_rows({"s1": "_s1"})
    path = tmp_path / "legacy.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    client = make_client(dataset=str(path))
    assert client.post("/predict", json={"features": {**record(), "_s1": record()["s1"]}}).status_code == 422
    features = {("_s1" if name == "s1" else name): value for name, value in record().items()}
    assert client.post("/predict", json={"features": features}).status_code == 200


def test_the_public_model_shows_no_statistics_of_the_training_data(client: TestClient) -> None:
    public = client.get("/model").json()
    assert public["features"] == [{"name": name, "type": "number", "nullable": False} for name in FEATURES]
    text = str(public)
    assert not any(word in text for word in ("'mean'", "'std'", "'min'", "'max'", "bin_edges", "bin_fractions"))
    assert client.get("/admin/model").status_code == 401
    private = client.get("/admin/model", headers=admin_headers(ADMIN_TOKEN)).json()
    assert [f["name"] for f in private["features"]] == list(FEATURES) and "bin_edges" in private["features"][0]


def test_a_changed_schema_trains_its_own_model_and_keeps_the_old_ones(make_client, tmp_path: Path) -> None:
    data_dir = tmp_path / "volume"
    header, rows = diabetes_rows()
    first = write_project(tmp_path / "first", REGRESSION.format(name="clinic"), header, rows)
    before = make_client(model_project=first, data_dir=data_dir)
    served_before = before.get("/model").json()
    renamed_header, _ = diabetes_rows({"bmi": "body_mass_index"})
    second = write_project(tmp_path / "second", REGRESSION.format(name="clinic"), renamed_header, rows)
    after = make_client(model_project=second, data_dir=data_dir)  # the same volume, the project changed under it
    served_after = after.get("/model").json()
    assert served_after["version"] == "v0001" and served_after["created_at"] >= served_before["created_at"]
    assert [f["name"] for f in served_after["features"]][2] == "body_mass_index"
    renamed = {("body_mass_index" if n == "bmi" else n): v for n, v in record().items()}
    assert after.post("/predict", json={"features": renamed}).status_code == 200
    stores = sorted(p.name for p in (data_dir / "projects").iterdir())
    assert len(stores) == 2 and all(name.startswith("clinic-") for name in stores)
    again = make_client(model_project=first, data_dir=data_dir)  # back to the first: its own versions, untouched
    assert again.get("/model").json()["data_fingerprint"] == served_before["data_fingerprint"]
    assert again.get("/admin/versions", headers=admin_headers(ADMIN_TOKEN)).json()["current"] == "v0001"


def test_a_dataset_switched_under_a_registry_is_not_served_with_the_old_model(make_client, tmp_path: Path) -> None:
    """MLAPI_DATASET (no project) keeps one registry: a version trained on other features must not answer."""
    data_dir = tmp_path / "volume"
    make_client(data_dir=data_dir)  # trains v0001 on the bundled data
    header, rows = diabetes_rows({"bmi": "body_mass_index"})
    path = tmp_path / "other.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    switched = make_client(data_dir=data_dir, dataset=str(path))
    assert switched.get("/ready").status_code == 503
    renamed = {("body_mass_index" if n == "bmi" else n): v for n, v in record().items()}
    assert switched.post("/predict", json={"features": renamed}).status_code == 503
    assert "MLAPI_MODEL_PROJECT" in switched.app.state.service.load_error
    refused = switched.get("/model")  # the public answer carries no internal text: the reason is in the log
    assert refused.status_code == 503 and refused.json() == {"detail": "no model loaded"}


def test_a_project_with_the_dataset_variables_set_is_refused(tmp_path: Path) -> None:
    from app.data import load_configured
    from app.settings import Settings

    settings = Settings(data_dir=tmp_path, model_project=EXAMPLES / "diabetes", dataset="diabetes")
    with pytest.raises(DatasetError, match="unset MLAPI_DATASET and MLAPI_TARGET_COLUMN"):
        load_configured(settings)


@pytest.mark.parametrize("estimator", ["ridge", "hist_gradient_boosting", "random_forest"])
@pytest.mark.parametrize("task", ["regression", "classification"])
def test_a_project_of_mostly_categories_trains_with_every_estimator(
    make_client, tmp_path: Path, estimator: str, task: str
) -> None:
    """One number beside an eight-valued category: the one-hot columns are most of the matrix, which the column
    transformer used to hand on sparse, and the linear models' scaler refused ("Cannot center sparse matrices")."""
    days = [f"day{i}" for i in range(8)]
    rows = [
        [i % 10 / 10, days[i % 8], (i % 8) * 3 + i % 10 / 10 if task == "regression" else f"c{i % 8 % 3}"]
        for i in range(240)
    ]
    toml = (
        f'[model]\nname = "mostly-categories"\ntask = "{task}"\ntarget = "y"\ndata = "data/train.csv"\n'
        f'[features]\nx = "number"\nday = {{ type = "category", values = {days!r} }}\n'.replace("'", '"')
    )
    directory = write_project(tmp_path / "project", toml, ["x", "day", "y"], rows)
    service = make_client(model_project=directory, estimator=estimator)
    answer = service.post("/predict", json={"features": {"x": 0.5, "day": "day3"}})
    assert answer.status_code == 200, answer.text
