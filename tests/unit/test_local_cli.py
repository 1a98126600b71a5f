"""`make local-up MODEL=<dir>`: which project the local stack serves, and a project refused before any build."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.datasource import data_credentials
from infra.local.cli import chosen_project, remember_project
from infra.local.images import BuildError, check_project
from infra.local.stack import LocalStackError, host_data_credentials

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


def test_make_local_up_hands_the_stack_this_machines_aws_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A project with s3:// data: the stack's swarm secret holds the credentials boto3 finds here (a session token
    too), and none found stops `make local-up` naming the variables to set."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(LocalStackError, match=r"MODEL=.*: model.data is an s3:// object .* export AWS_ACCESS_KEY_ID"):
        host_data_credentials(tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLOCAL")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session")
    parsed = data_credentials(_written(tmp_path / "credentials", host_data_credentials(tmp_path)))
    assert parsed == {
        "aws_access_key_id": "AKIDLOCAL",
        "aws_secret_access_key": "local-secret",
        "aws_session_token": "session",
    }


def _written(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
