"""A retrain's candidate trains in a process of its own (app/training_process.py): the same candidate as in-process;
a training that runs too long, takes too much memory, raises or is killed is stopped alone, counted as a failed retrain,
and the served model keeps answering."""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.data import load_dataset, split_holdout
from app.settings import Settings
from app.training import train_version
from app.training_process import memory_bound_mb, train_in_child
from tests.support.projects import PENGUIN, penguins_with_code
from tests.support.service import admin_headers, metric_value

# The project's own code: it trains normally until a file named MISBEHAVE appears beside it, then does what it says.
MISBEHAVING = """
import os
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression


class Misbehaving(LogisticRegression):
    def fit(self, X, y, sample_weight=None):
        flag = Path(__file__).with_name("MISBEHAVE")
        what = flag.read_text() if flag.exists() else ""
        if what == "sleep":
            time.sleep(60)
        elif what == "memory":
            hoard = np.ones(250_000_000)  # 2 GB, touched
            time.sleep(60)
            del hoard
        elif what == "raise":
            raise RuntimeError("the feature store is down")
        elif what == "kill":
            os.kill(os.getpid(), 9)
        return super().fit(X, y, sample_weight=sample_weight)


def make():
    from sklearn.compose import make_column_transformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    numbers = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g", "year"]
    return make_pipeline(
        make_column_transformer(
            (make_pipeline(SimpleImputer(), StandardScaler()), numbers),
            (make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder(handle_unknown="ignore")),
             ["island", "sex"]),
        ),
        Misbehaving(max_iter=2000),
    )
"""


def project(tmp_path: Path) -> Path:
    keys = 'pipeline = "misbehaving_code:make"\ntrusted_types = ["misbehaving_code.Misbehaving"]\n'
    return penguins_with_code(tmp_path / "penguins", {"misbehaving_code.py": MISBEHAVING}, keys)


@pytest.fixture(autouse=True)
def forget_project_module() -> None:
    """Each test's project has its own copy of the module: never reuse another test's import of it."""
    yield
    sys.modules.pop("misbehaving_code", None)
    sys.path[:] = [entry for entry in sys.path if not entry.endswith("/penguins")]


@pytest.fixture
def isolated(make_client: Callable[..., TestClient], tmp_path: Path) -> Callable[..., tuple[TestClient, Path]]:
    def start(**settings: object) -> tuple[TestClient, Path]:
        directory = project(tmp_path)
        return make_client(model_project=directory, retrain_isolation=True, **settings), directory

    return start


def retrain_with(client: TestClient, directory: Path, behaviour: str) -> tuple[dict, float]:
    (directory / "MISBEHAVE").write_text(behaviour)
    started = time.monotonic()
    response = client.post("/admin/retrain", headers=admin_headers())
    assert response.status_code == 200, response.text
    return response.json(), time.monotonic() - started


def assert_still_serving(client: TestClient) -> None:
    answer = client.post("/predict", json={"features": PENGUIN})
    assert answer.status_code == 200 and answer.json()["model_version"] == "v0001"
    assert metric_value(client.get("/metrics").text, "mlapi_retrains_total", outcome="failed") == 1.0
    assert multiprocessing.active_children() == []  # the child is gone, not left running or a zombie


def test_the_child_trains_the_candidate_the_service_would(tmp_path: Path) -> None:
    dataset = load_dataset("diabetes")
    development, holdout = split_holdout(dataset, 42)
    settings = Settings(data_dir=tmp_path, estimator="hist_gradient_boosting")
    here = train_version(settings, dataset, development, holdout, 0)
    child = train_in_child(settings, dataset, development, holdout, 0)
    assert np.array_equal(child.predict(holdout.X, 0.9)[0], here.predict(holdout.X, 0.9)[0])
    assert child.metadata.metrics == here.metadata.metrics
    assert list((tmp_path / "candidates").iterdir()) == []  # its scratch directory is gone


@pytest.mark.parametrize(
    ("bounds", "behaviour", "says"),
    [
        ({"retrain_timeout_s": 3}, "sleep", "training took longer than MLAPI_RETRAIN_TIMEOUT_S (3 s): it was stopped"),
        ({"retrain_memory_mb": 900}, "memory", "more than MLAPI_RETRAIN_MEMORY_MB allows (900 MB): it was stopped"),
    ],
)
def test_a_training_out_of_its_bounds_is_stopped(isolated, bounds: dict, behaviour: str, says: str) -> None:
    client, directory = isolated(**bounds)
    outcome, took = retrain_with(client, directory, behaviour)
    assert outcome["outcome"] == "failed" and says in outcome["reason"], outcome
    assert took < 30  # the training itself would have taken a minute
    assert_still_serving(client)


def test_an_error_in_the_users_code_is_the_outcome(isolated) -> None:
    client, directory = isolated()
    outcome, _ = retrain_with(client, directory, "raise")
    assert outcome["outcome"] == "failed"
    assert outcome["reason"] == "candidate failed: RuntimeError: the feature store is down"
    assert_still_serving(client)


def test_a_killed_training_is_named(isolated) -> None:
    client, directory = isolated()
    outcome, _ = retrain_with(client, directory, "kill")
    assert outcome["outcome"] == "failed"
    assert "the training process was killed (SIGKILL), most likely by the kernel" in outcome["reason"]
    assert_still_serving(client)


def test_a_good_training_in_the_child_is_promoted_or_judged(isolated) -> None:
    client, directory = isolated()
    outcome, _ = retrain_with(client, directory, "")
    assert outcome["outcome"] in ("rejected", "promoted"), outcome  # the same code and data: judged, not failed
    assert outcome["candidate_metrics"]["log_loss"] > 0


def test_the_memory_bound_is_a_share_of_the_containers_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = tmp_path / "memory.max"
    limit.write_text(str(1000 * 2**20))
    monkeypatch.setattr("app.training_process.MEMORY_LIMIT_FILES", (str(limit),))
    assert memory_bound_mb(None) == 600
    assert memory_bound_mb(300) == 300
    limit.write_text("max")  # cgroup v2: no limit
    assert memory_bound_mb(None) is None
