"""Training a version: the split every version is judged on, the candidate's fit, the first version. Pure but for the
registry it reads the holdout from and writes the first version to; the service (app/service.py), the image build
(`python -m app train`) and the retrain's own process (app/training_process.py) all train through here."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import sklearn.base
import skops.io as sio

from app.data import Dataset, split_holdout
from app.model import Predictor, train
from app.registry import Registry, untrusted_types
from app.settings import Settings

if TYPE_CHECKING:
    from app.pgregistry import SharedRegistry


def development_and_holdout(
    settings: Settings, dataset: Dataset, registry: Registry | SharedRegistry
) -> tuple[Dataset, Dataset]:
    """The rows to train on and the fixed holdout every version is judged on (stored with the first version)."""
    seed = settings.holdout_seed
    if seed is None:
        seed = registry.holdout_seed()
    development, holdout = split_holdout(dataset, seed)
    if dataset.times is not None:  # the latest rows of the data as it is now: judged on what came last
        registry.save_holdout(holdout)
        return development, holdout
    stored = registry.load_holdout(dataset)
    if stored is None:
        registry.save_holdout(holdout)
        return development, holdout
    if dataset.data_url is not None:  # fetched again: every row but those held out the first time, wherever they are
        return dataset.rows(~holds(stored, dataset)), stored
    return development, stored


def holds(holdout: Dataset, data: Dataset) -> np.ndarray:
    """Per row of ``data``: True where it equals a row of ``holdout`` (features and target)."""
    held = {row.tobytes() for row in np.column_stack([holdout.X, holdout.y])}
    return np.array([row.tobytes() in held for row in np.column_stack([data.X, data.y])], dtype=bool)


def train_version(
    settings: Settings,
    dataset: Dataset,
    development: Dataset,
    holdout: Dataset,
    n_observations: int,
    first: bool = False,
) -> Predictor:
    """A new version, only if the registry will load it again: a type in the project's own pipeline that is not
    trusted stops here, naming the key that trusts it, not at the next load. The project's code trains it; else a
    pipeline trained elsewhere is the first version as it is, and a fresh copy of it (same steps and
    hyper-parameters) is refitted at every retrain; else the built-in estimator."""
    pipeline, imported = dataset.pipeline, dataset.imported
    user_pipeline, prefit, estimator = None, None, settings.estimator
    if pipeline is not None:
        user_pipeline, estimator = pipeline(), f"{pipeline.__module__}:{pipeline.__name__}"
    elif imported is not None and first:
        prefit, estimator = imported.estimator, f"{imported.path.name} (imported)"
    elif imported is not None:
        user_pipeline, estimator = sklearn.base.clone(imported.estimator), f"{imported.path.name} (refitted)"
    predictor = train(
        development,
        holdout,
        estimator=estimator,
        levels=settings.confidence_levels,
        seed=settings.seed,
        n_observations=n_observations,
        user_pipeline=user_pipeline,
        prefit=prefit,
    )
    untrusted = untrusted_types(sio.dumps(predictor.conformal), dataset.trusted_types)
    if untrusted:
        raise ValueError(
            f"the trained pipeline holds types the service does not load: {untrusted}; if they are the project's "
            "own, list them in model.trusted_types in mlapi.toml"
        )
    return predictor


def train_first_version(settings: Settings, dataset: Dataset, registry: Registry | SharedRegistry) -> str:
    """Train the first version from the base data, store it and make it current; its name."""
    development, holdout = development_and_holdout(settings, dataset, registry)
    predictor = train_version(settings, dataset, development, holdout, n_observations=0, first=True)
    version = registry.save(predictor, parent=None)
    registry.set_current(version)
    return version
