"""The built-in estimators a service can train, by name: adding one is one entry here (MLAPI_ESTIMATOR accepts
every key, and the settings' OpenAPI and error messages list them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ESTIMATORS: dict[str, Callable[[int], Any]] = {
    "hist_gradient_boosting": lambda seed: HistGradientBoostingRegressor(
        max_iter=200, learning_rate=0.05, random_state=seed
    ),
    "random_forest": lambda seed: RandomForestRegressor(
        n_estimators=200, min_samples_leaf=3, random_state=seed, n_jobs=1
    ),
    "ridge": lambda seed: make_pipeline(StandardScaler(), Ridge(alpha=1.0)),  # best holdout RMSE on the bundled data
}


def build_estimator(name: str, seed: int) -> Any:
    if name not in ESTIMATORS:
        raise ValueError(f"MLAPI_ESTIMATOR: unknown estimator {name!r} (one of {sorted(ESTIMATORS)})")
    return ESTIMATORS[name](seed)
