"""The one-call interval path equals MAPIE's own intervals: for every estimator and level, on inputs across and far
beyond the training range; and a conformity score whose width depends on the input keeps MAPIE's path."""

from __future__ import annotations

import numpy as np
import pytest

from app.data import load_dataset, split_holdout
from app.model import Predictor, train

LEVELS = [0.5, 0.8, 0.9, 0.95]


@pytest.fixture(scope="module")
def splits():
    return split_holdout(load_dataset("diabetes", "target"), 42)


@pytest.mark.parametrize("estimator", ["ridge", "hist_gradient_boosting", "random_forest"])
def test_one_call_intervals_equal_mapies(splits, estimator: str) -> None:
    development, holdout = splits
    predictor = train(development, holdout, estimator=estimator, levels=LEVELS, seed=42, n_observations=0)
    assert predictor.interval_offsets(), "absolute conformity score: constant width"
    rng = np.random.default_rng(7)
    X = np.vstack([holdout.X, rng.normal(0, 0.05, (500, holdout.X.shape[1])), rng.normal(0, 5.0, (50, 10))])
    points, intervals = predictor.conformal.predict_interval(X)
    for index, level in enumerate(LEVELS):
        fast = predictor.predict(X, level)
        assert np.array_equal(fast[0], points)
        np.testing.assert_allclose(fast[1], intervals[:, 0, index], rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(fast[2], intervals[:, 1, index], rtol=1e-12, atol=1e-9)


class InputDependentWidth:
    """A conformal model whose intervals widen with the first feature (as a normalized score's would)."""

    def predict(self, X: np.ndarray) -> np.ndarray:
        return X.sum(axis=1)

    def predict_interval(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        points = self.predict(X)
        widths = (1 + np.abs(X[:, :1])) * np.array([[1.0, 2.0, 3.0, 4.0]])
        return points, np.stack([points[:, None] - widths, points[:, None] + widths], axis=1)


def test_a_width_that_depends_on_the_input_keeps_mapies_path(splits) -> None:
    development, holdout = splits
    fitted = train(development, holdout, estimator="ridge", levels=LEVELS, seed=42, n_observations=0)
    predictor = Predictor(InputDependentWidth(), fitted.metadata)
    assert predictor.interval_offsets() == ()
    X = np.array([[0.0] * 10, [3.0] + [0.0] * 9])
    _, lower, upper = predictor.predict(X, 0.9)
    assert (upper - lower).tolist() == [6.0, 24.0]  # what the model says, not a constant width
