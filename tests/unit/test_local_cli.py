"""`make local-up MODEL=<dir>`: which project the local stack serves, and a project refused before any build."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.local.cli import chosen_project, remember_project
from infra.local.images import BuildError, check_project

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_the_project_of_the_last_up_is_kept_until_default(tmp_path: Path) -> None:
    assert chosen_project(tmp_path, None) is None  # nothing chosen yet: the bundled model
    project = chosen_project(tmp_path, "examples/diabetes")
    assert project == Path("examples/diabetes").resolve()
    assert chosen_project(tmp_path, None) is None  # not kept before an `up` served it
    remember_project(tmp_path, project)
    assert chosen_project(tmp_path, None) == project  # a plain `make local-up` keeps serving it
    assert chosen_project(tmp_path, "default") is None
    remember_project(tmp_path, None)
    assert chosen_project(tmp_path, None) is None


def test_a_project_is_checked_by_the_app_before_any_image_is_built(tmp_path: Path) -> None:
    check_project(EXAMPLES / "diabetes")
    check_project(EXAMPLES / "penguins")  # a classifier over categories and gaps
    with pytest.raises(BuildError, match=r"no mlapi.toml here \(write one with: python -m app init"):
        check_project(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "data.csv").write_text((EXAMPLES / "penguins" / "data" / "penguins.csv").read_text())
    (broken / "mlapi.toml").write_text(
        '[model]\nname = "b"\ntask = "classification"\ntarget = "kind"\ndata = "data.csv"\n'
    )
    with pytest.raises(
        BuildError, match=r"MODEL=.*broken: MLAPI_MODEL_PROJECT: .*model.target: column 'kind' is not in"
    ):
        check_project(broken)
