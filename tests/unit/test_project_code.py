"""The project's own training code (``model.pipeline``) and its own classes (``model.trusted_types``): a user's
ColumnTransformer selecting columns by name is trained, served and loaded again; code that fails, returns the wrong
thing or holds untrusted types is refused naming the file, the key and the fix."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.data import DatasetError, load_project_dataset
from app.project import PROJECT_FILE
from tests.support.projects import PENGUIN, penguins_with_code
from tests.support.service import admin_headers

PROJECT_DIR = Path(__file__).resolve().parents[2]
USERS_PIPELINE = '''
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler


class BillRatio(BaseEstimator, TransformerMixin):
    """A feature of the user's own: bill length over depth (the species differ most in it)."""

    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return (X["bill_length_mm"] / X["bill_depth_mm"]).to_frame("ratio").fillna(2.5)


def make_pipeline_by_name(ratio=False):
    columns = [
        ("places", make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder()), ["island", "sex"]),
        ("sizes", make_pipeline(SimpleImputer(), StandardScaler()), ["bill_length_mm", "flipper_length_mm"]),
    ]
    if ratio:
        columns.append(("ratio", BillRatio(), ["bill_length_mm", "bill_depth_mm"]))
    return make_pipeline(ColumnTransformer(columns), LogisticRegression(max_iter=1000))


def with_ratio():
    return make_pipeline_by_name(ratio=True)


def broken():
    raise RuntimeError("the feature store is down")


def not_an_estimator():
    return "LogisticRegression()"
'''


def project_with_code(tmp_path: Path, pipeline: str, extra: str = "", module: str = "penguin_code") -> Path:
    keys = f'pipeline = "{module}:{pipeline}"\n{extra}'
    return penguins_with_code(tmp_path / "penguins", {f"{module}.py": USERS_PIPELINE}, keys)


@pytest.fixture(autouse=True)
def forget_project_modules() -> None:
    """Each test's project has its own copy of the module: never reuse another test's import of it."""
    yield
    for name in [n for n in sys.modules if n.startswith("penguin_code")]:
        del sys.modules[name]
    sys.path[:] = [entry for entry in sys.path if not entry.endswith("/penguins")]


def test_the_users_pipeline_is_trained_served_and_named(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    service = make_client(model_project=project_with_code(tmp_path, "make_pipeline_by_name"))
    card = service.get("/model").json()
    assert card["estimator"] == "penguin_code:make_pipeline_by_name"
    answer = service.post("/predict", json={"features": PENGUIN, "confidence": 0.9}).json()
    assert answer["label"] == "Chinstrap" and answer["label"] in answer["prediction_set"]
    assert service.post("/admin/retrain", headers=admin_headers()).json()["outcome"] == "rejected"  # same code, data


def test_the_projects_own_class_is_loaded_only_when_the_project_trusts_it(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    untrusted = project_with_code(tmp_path / "a", "with_ratio")
    with pytest.raises(
        ValueError,
        match=r"\['penguin_code.BillRatio'\]; if they are the project's own, list them in model.trusted_types",
    ):
        make_client(model_project=untrusted, data_dir=tmp_path / "a" / "data")

    own = 'trusted_types = ["penguin_code_b.BillRatio"]\n'  # one process, one module per name: b has its own
    trusted = project_with_code(tmp_path / "b", "with_ratio", own, module="penguin_code_b")
    first = make_client(model_project=trusted, data_dir=tmp_path / "b" / "data")
    answer = first.post("/predict", json={"features": PENGUIN}).json()
    again = make_client(model_project=trusted, data_dir=tmp_path / "b" / "data")  # a restart: v0001 loaded from disk
    assert again.get("/model").json()["version"] == "v0001"
    assert again.post("/predict", json={"features": PENGUIN}).json()["probabilities"] == answer["probabilities"]


@pytest.mark.parametrize(
    ("function", "says"),
    [
        ("broken", "penguin_code:broken() raised RuntimeError: the feature store is down"),
        ("not_an_estimator", "returned str, which has no fit or predict_proba: a classification needs"),
        ("missing", "penguin_code.py has no function 'missing'"),
    ],
)
def test_code_that_cannot_train_is_refused_before_serving(tmp_path: Path, function: str, says: str) -> None:
    directory = project_with_code(tmp_path, function)
    with pytest.raises(DatasetError) as refused:
        load_project_dataset(directory)
    assert f"{directory / PROJECT_FILE} model.pipeline: " in str(refused.value) and says in str(refused.value)


def test_a_module_name_that_shadows_an_installed_one_is_refused(tmp_path: Path) -> None:
    directory = project_with_code(tmp_path, "make_pipeline_by_name", module="json")
    with pytest.raises(DatasetError, match=r"the module name 'json' is already taken by .*: rename the project's file"):
        load_project_dataset(directory)


def test_check_and_serve_name_the_failing_code(tmp_path: Path) -> None:
    directory = project_with_code(tmp_path, "broken")
    for command in ("check", "serve"):
        result = subprocess.run(
            [sys.executable, "-m", "app", command],
            env={"MLAPI_MODEL_PROJECT": str(directory), "MLAPI_DATA_DIR": str(tmp_path / "d"), "PATH": "/usr/bin"},
            cwd=PROJECT_DIR,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, (command, result.stderr)
        assert "model.pipeline: penguin_code:broken() raised RuntimeError" in result.stderr
        assert "Traceback" not in result.stderr


# -- a pipeline trained elsewhere (model.model_file, python -m app import-model) ------------------------------------
def users_trained_pipeline(directory: Path) -> Path:
    """What the ML engineer already has: a pipeline fitted in a notebook on pandas.read_csv's frame, saved with
    joblib."""
    import joblib
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    frame = pd.read_csv(directory / "data" / "penguins.csv")
    columns = ColumnTransformer(
        [
            ("places", make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder()), ["island", "sex"]),
            ("sizes", SimpleImputer(), ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"]),
        ]
    )
    model = make_pipeline(columns, LogisticRegression(max_iter=5000)).fit(
        frame.drop(columns="species"), frame["species"]
    )
    joblib.dump(model, directory / "notebook-model.joblib")
    return directory / "notebook-model.joblib"


def import_model(source: Path, directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app", "import-model", str(source), "--project", str(directory)],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_pipeline_trained_elsewhere_is_imported_served_and_refitted(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    import joblib
    import pandas as pd

    directory = tmp_path / "penguins"
    shutil.copytree(PROJECT_DIR / "examples" / "penguins", directory)
    source = users_trained_pipeline(directory)
    result = import_model(source, directory)
    assert result.returncode == 0, result.stderr
    assert "runs whatever code the pickle holds" in result.stderr
    assert 'model_file = "model.skops"' in (directory / PROJECT_FILE).read_text()
    assert (directory / "model.skops.json").is_file()

    service = make_client(model_project=directory)
    card = service.get("/model").json()
    assert card["estimator"] == "model.skops (imported)" and card["version"] == "v0001"
    answer = service.post("/predict", json={"features": PENGUIN}).json()
    as_read = {name: float("nan") if value is None else value for name, value in PENGUIN.items()}  # read_csv's gap
    notebook = joblib.load(source).predict_proba(pd.DataFrame([as_read]))[0]
    assert list(answer["probabilities"].values()) == pytest.approx(list(notebook), rel=1e-9)
    outcome = service.post("/admin/retrain", headers=admin_headers()).json()
    assert outcome["outcome"] in ("promoted", "rejected") and "log-loss" in outcome["reason"], outcome
    history = service.get("/admin/versions", headers=admin_headers()).json()
    assert history


def test_an_import_with_types_nobody_trusted_writes_nothing(tmp_path: Path) -> None:
    import joblib

    directory = project_with_code(tmp_path, "with_ratio")
    sys.path.append(str(directory))
    import pandas as pd
    from penguin_code import with_ratio  # the user's own class, as in their notebook

    frame = pd.read_csv(directory / "data" / "penguins.csv")
    joblib.dump(with_ratio().fit(frame.drop(columns="species"), frame["species"]), tmp_path / "m.joblib")
    result = import_model(tmp_path / "m.joblib", directory)
    assert result.returncode == 1
    assert "holds types skops does not trust: ['penguin_code.BillRatio']" in result.stderr
    assert "model.trusted_types" in result.stderr and not (directory / "model.skops").exists()


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda d: d.joinpath("model.skops.json").write_text('{"sklearn_version": "1.2.2"}'),
         "was trained with scikit-learn 1.2.2, this service runs"),
        (lambda d: d.joinpath("model.skops").write_bytes(b"not a zip"), "model.skops is not a skops file"),
        (lambda d: d.joinpath(PROJECT_FILE).write_text(
            d.joinpath(PROJECT_FILE).read_text().replace('model_file = "model.skops"', 'model_file = "m.joblib"')),
         "'m.joblib': the service loads skops files only, never pickles: convert it"),
    ],
)  # fmt: skip
def test_a_model_file_that_cannot_be_served_is_refused_before_serving(
    tmp_path: Path, change: Callable[[Path], object], says: str
) -> None:
    directory = tmp_path / "penguins"
    shutil.copytree(PROJECT_DIR / "examples" / "penguins", directory)
    assert import_model(users_trained_pipeline(directory), directory).returncode == 0
    change(directory)
    with pytest.raises(DatasetError, match=r"model\.model_file") as refused:
        load_project_dataset(directory)
    assert says in str(refused.value)
