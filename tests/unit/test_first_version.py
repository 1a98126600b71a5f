"""The first version is trained at image build (`python -m app train`, app/Dockerfile and Dockerfile.project), not in
a replica's health-check window: a replica with an empty registry starts from it, byte for byte, without training;
only a service run outside the image trains in the serving process, and says so."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import app.training
from app.project import PROJECT_FILE
from app.registry import Registry

PROJECT_DIR = Path(__file__).resolve().parents[2]
PENGUINS = PROJECT_DIR / "examples" / "penguins"
PENGUIN = {
    "island": "Dream",
    "bill_length_mm": None,
    "bill_depth_mm": None,
    "flipper_length_mm": None,
    "body_mass_g": None,
    "sex": None,
    "year": 2008,
}


def train_into(directory: Path, project: Path | None = None) -> subprocess.CompletedProcess:
    """The image build's step, run as the build runs it: a fresh process, the project named by the environment."""
    environment = {"PATH": "/usr/bin:/bin", "MLAPI_DATA_DIR": str(directory / "unused")}
    if project is not None:
        environment["MLAPI_MODEL_PROJECT"] = str(project)
    return subprocess.run(
        [sys.executable, "-m", "app", "train", "--into", str(directory)],
        env=environment,
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the penguins project's image holds at /opt/mlapi/first-version."""
    directory = tmp_path_factory.mktemp("first-version")
    result = train_into(directory, PENGUINS)
    assert result.returncode == 0, result.stderr
    assert '"version": "v0001"' in result.stdout
    return directory


def never_trains(*args: object, **kwargs: object) -> None:
    raise AssertionError("a replica trained although the image holds a first version")


def model_file(store: Path) -> bytes:
    return (store / "models" / "v0001" / "model.skops").read_bytes()


def test_a_replica_starts_from_the_version_built_into_the_image(
    built: Path, make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(app.training, "train", never_trains)
    service = make_client(model_project=PENGUINS, first_version_dir=built, holdout_seed=None, data_dir=tmp_path)
    assert service.get("/model").json()["version"] == "v0001"
    (store,) = (built / "projects").iterdir()
    assert model_file(tmp_path / "projects" / store.name) == model_file(store)  # the same file, not a new training
    assert service.get("/ready").status_code == 200
    answer = service.post("/predict", json={"features": PENGUIN, "confidence": 0.9})
    assert answer.status_code == 200, answer.text
    assert answer.json()["label"] in answer.json()["prediction_set"]


def test_the_volume_keeps_the_images_holdout_and_later_images_change_nothing(
    built: Path, make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    (store,) = (built / "projects").iterdir()
    data = tmp_path / "volume"
    make_client(model_project=PENGUINS, first_version_dir=built, holdout_seed=None, data_dir=data)
    on_volume = data / "projects" / store.name
    assert (on_volume / "holdout.npz").read_bytes() == (store / "holdout.npz").read_bytes()
    assert (on_volume / "holdout-seed").read_text() == (store / "holdout-seed").read_text()

    other_image = tmp_path / "another-build"
    assert train_into(other_image, PENGUINS).returncode == 0
    again = make_client(model_project=PENGUINS, first_version_dir=other_image, holdout_seed=None, data_dir=data)
    assert again.get("/model").json()["version"] == "v0001"
    assert model_file(other_image / "projects" / store.name) != model_file(store)  # another build, another seed
    assert model_file(on_volume) == model_file(store)  # the volume's own, kept


def test_train_keeps_an_existing_first_version(built: Path) -> None:
    (store,) = (built / "projects").iterdir()
    before = model_file(store)
    assert train_into(built, PENGUINS).returncode == 0
    assert model_file(store) == before
    assert Registry(store).version_names() == ["v0001"]


def test_without_a_built_version_the_service_trains_and_says_why(
    make_client: Callable[..., TestClient], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    empty = tmp_path / "image-without-a-version"
    empty.mkdir()
    with caplog.at_level(logging.WARNING, logger="app.service"):
        service = make_client(first_version_dir=empty)
    assert service.get("/model").json()["version"] == "v0001"
    assert (
        f"trained the first version v0001 in the serving process: no first version was built for this data "
        f"(none under {empty})" in caplog.text
    )


def test_a_project_that_cannot_train_fails_the_build_naming_the_error(tmp_path: Path) -> None:
    project = tmp_path / "penguins"
    shutil.copytree(PENGUINS, project)
    (project / "fails.py").write_text(
        "from sklearn.linear_model import LogisticRegression\n\n"
        "def make():\n    return LogisticRegression(C=-1.0)  # valid to construct, refused by fit\n"
    )
    text = (project / PROJECT_FILE).read_text()
    (project / PROJECT_FILE).write_text(
        text.replace('data = "data/penguins.csv"\n', 'data = "data/penguins.csv"\npipeline = "fails:make"\n')
    )
    result = train_into(tmp_path / "first-version", project)
    assert result.returncode == 1
    assert "error: training penguins's first version failed:" in result.stderr and "'C' parameter" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_installation_with_its_own_holdout_seed_keeps_its_split(
    built: Path, make_client: Callable[..., TestClient], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pinned seed (MLAPI_HOLDOUT_SEED, or a seed file an earlier registry left on the volume) is the installation's
    split: the image's version, judged on another, is not imported; the first version trains on the kept split."""
    (store,) = (built / "projects").iterdir()
    pinned = tmp_path / "volume" / "projects" / store.name
    pinned.mkdir(parents=True)
    (pinned / "holdout-seed").write_text("42\n")
    with caplog.at_level(logging.INFO, logger="app.service"):
        make_client(model_project=PENGUINS, first_version_dir=built, holdout_seed=None, data_dir=tmp_path / "volume")
    assert "judged on another holdout than this installation's" in caplog.text
    assert (pinned / "holdout-seed").read_text() == "42\n"
    assert model_file(pinned) != model_file(store)
