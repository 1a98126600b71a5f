"""The standard pipeline compiled into array operations (app/compiled.py) answers as scikit-learn does, for every
type, gap and category, and is served only when it did; everything else is left to scikit-learn."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from app import model as model_module
from app.compiled import UnknownCategory, compile_pipeline, covering_rows
from app.estimators import build_pipeline
from app.tabular import Column, Schema

COLUMNS = (
    Column("length", "number", nullable=True),
    Column("count", "integer"),
    Column("flag", "boolean", nullable=True),
    Column("colour", "category", nullable=True, values=("red", "green", "blue")),
    Column("size", "category", values=("S", "L")),
)


def rows(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = np.column_stack(
        [
            rng.normal(10, 3, count),
            rng.integers(0, 50, count).astype(float),
            rng.integers(0, 2, count).astype(float),
            rng.integers(0, 3, count).astype(float),
            rng.integers(0, 2, count).astype(float),
        ]
    )
    for position in (0, 2, 3):  # the nullable columns get gaps
        X[rng.random(count) < 0.15, position] = np.nan
    return X


def target(X: np.ndarray, classes: int) -> np.ndarray:
    score = np.nan_to_num(X[:, 0]) / 3 + X[:, 1] / 20 + np.nan_to_num(X[:, 3], nan=1.5) - X[:, 4]
    if classes == 0:
        return score * 7.0 + 3.0
    return np.digitize(score, np.quantile(score, np.linspace(0, 1, classes + 1)[1:-1])).astype(float)


@pytest.mark.parametrize(("task", "classes"), [("classification", 3), ("classification", 2), ("regression", 0)])
def test_the_compiled_standard_pipeline_answers_as_scikit_learn(task: str, classes: int) -> None:
    schema = Schema(COLUMNS, task, tuple(f"c{i}" for i in range(classes)))
    pipeline = build_pipeline(schema, "ridge", seed=0)
    X = rows(400, seed=1)
    pipeline.fit(X, target(X, classes))
    compiled = compile_pipeline(pipeline)
    assert compiled is not None
    fresh = rows(300, seed=2)
    expected = pipeline.predict_proba(fresh) if task == "classification" else pipeline.predict(fresh)
    np.testing.assert_allclose(compiled(fresh), expected, rtol=1e-12, atol=1e-12)
    one = compiled(fresh[:1])
    assert one.shape == expected[:1].shape


def test_a_code_outside_the_categories_is_left_to_scikit_learns_error() -> None:
    schema = Schema(COLUMNS, "classification", ("a", "b", "c"))
    pipeline = build_pipeline(schema, "ridge", seed=0)
    X = rows(200, seed=3)
    pipeline.fit(X, target(X, 3))
    unknown = rows(2, seed=4)
    unknown[:, 3] = [np.nan, 7.0]
    with pytest.raises(UnknownCategory):
        compile_pipeline(pipeline)(unknown)
    with pytest.raises(ValueError, match="unknown categories"):
        pipeline.predict_proba(unknown)


@pytest.mark.parametrize("estimator", ["hist_gradient_boosting", "random_forest"])
def test_other_estimators_are_not_compiled(estimator: str) -> None:
    schema = Schema(COLUMNS, "classification", ("a", "b", "c"))
    pipeline = build_pipeline(schema, estimator, seed=0)
    X = rows(120, seed=5)
    pipeline.fit(X, target(X, 3))
    assert compile_pipeline(pipeline) is None


def test_plain_numbers_and_a_users_own_pipeline_are_not_compiled() -> None:
    plain = build_pipeline(Schema.numbers(["a", "b"]), "ridge", seed=0)
    plain.fit(np.arange(20.0).reshape(10, 2), np.arange(10.0))
    assert compile_pipeline(plain) is None
    assert compile_pipeline(object()) is None


def test_covering_rows_hold_every_gap_and_every_code() -> None:
    probes = np.zeros((2, 5))
    covered = covering_rows(probes, np.array([True, False, True, True, False]), {2: 2, 3: 3, 4: 2})
    assert np.isnan(covered[2:4, [0, 2, 3]]).all() and not np.isnan(covered[:, [1, 4]]).any()
    assert set(covered[:, 3][~np.isnan(covered[:, 3])]) == {0.0, 1.0, 2.0}
    assert set(covered[:, 4]) == {0.0, 1.0}


def test_a_served_classifier_uses_the_compiled_pipeline_only_when_it_agrees(make_client, monkeypatch) -> None:
    from tests.support.projects import EXAMPLES, PENGUIN

    client = make_client(model_project=EXAMPLES / "penguins")
    predictor = client.app.state.service._current
    assert predictor.compiled() is not None  # the standard pipeline of a typed project
    served = client.post("/predict", json={"features": PENGUIN, "confidence": 0.9}).json()
    X = predictor.probe_rows()
    with_sklearn = predictor._reference(X)
    np.testing.assert_allclose(predictor.classify(X, 0.9)[0], with_sklearn, rtol=1e-12, atol=1e-12)

    # A compiled pipeline that disagrees with scikit-learn is never served: the answers stay scikit-learn's.
    monkeypatch.setattr(model_module, "compile_pipeline", lambda pipeline: lambda X: np.full((len(X), 3), 1 / 3))
    predictor._compiled = None
    assert predictor.compiled() is None
    np.testing.assert_allclose(predictor.classify(X, 0.9)[0], with_sklearn, rtol=1e-12, atol=1e-12)
    again = client.post("/predict", json={"features": PENGUIN, "confidence": 0.9}).json()
    assert again["label"] == served["label"]
    assert again["probabilities"] == pytest.approx(served["probabilities"], rel=1e-9)


def test_a_served_typed_regression_uses_the_compiled_pipeline(make_client, tmp_path) -> None:
    """A regression over categories and gaps (the penguins' measurements from their island, sex and species)."""
    import shutil

    from app.project import PROJECT_FILE, init_project
    from tests.support.projects import EXAMPLES

    project = tmp_path / "weights"
    shutil.copytree(EXAMPLES / "penguins", project)
    data = project / "data" / "penguins.csv"
    frame = pd.read_csv(data)
    frame[frame["body_mass_g"].notna()].to_csv(data, index=False)
    (project / PROJECT_FILE).write_text(init_project(project, data, "body_mass_g", "regression", "weights", []))
    client = make_client(model_project=project)
    predictor = client.app.state.service._current
    assert predictor.compiled() is not None
    X = predictor.probe_rows()
    np.testing.assert_allclose(predictor.point(X), predictor.conformal.predict(X), rtol=1e-12)
    bird = {"species": "Gentoo", "island": "Biscoe", "bill_length_mm": 47.5, "bill_depth_mm": 15.0,
            "flipper_length_mm": 215, "sex": None, "year": 2009}  # fmt: skip
    answer = client.post("/predict", json={"features": bird, "confidence": 0.9})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["interval"]["lower"] < body["prediction"] < body["interval"]["upper"]
    assert 4000 < body["prediction"] < 6500
