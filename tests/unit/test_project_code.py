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
from tests.support.service import admin_headers

PROJECT_DIR = Path(__file__).resolve().parents[2]
PENGUIN = {
    "island": "Dream",
    "bill_length_mm": 49.0,
    "bill_depth_mm": 19.5,
    "flipper_length_mm": 196,
    "body_mass_g": 3800,
    "sex": None,
    "year": 2008,
}
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
    directory = tmp_path / "penguins"
    shutil.copytree(PROJECT_DIR / "examples" / "penguins", directory)
    (directory / f"{module}.py").write_text(USERS_PIPELINE)
    text = (directory / PROJECT_FILE).read_text()
    model_keys = f'pipeline = "{module}:{pipeline}"\n{extra}'
    (directory / PROJECT_FILE).write_text(
        text.replace('data = "data/penguins.csv"\n', f'data = "data/penguins.csv"\n{model_keys}')
    )
    return directory


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
