"""The model project an operator names (the modelProject key, `make local-up MODEL=`): found, and checked by the app
itself (`python -m app check`), before any image is built or anything deployed."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
PROJECT_DOCKERFILE = PROJECT_DIR / "app" / "Dockerfile.project"


class ProjectRefused(ValueError):
    """The project cannot be served; the message is the app's, naming the file, the key and the fix."""


def resolve_project(value: str, base: Path = PROJECT_DIR) -> Path:
    """A project path as configured: absolute, or relative to the Pulumi project (so it may live in the user's own
    repository beside this one)."""
    path = Path(value).expanduser()
    return (path if path.is_absolute() else base / path).resolve()


def check_project(project: Path, data_credentials: str | None = None) -> None:
    """The app's own check of a model project: its schema against its data, its pipeline code called once.
    ``data_credentials``: the AWS credentials file the stack will fetch s3:// data with (else this machine's own)."""
    if not (project / "mlapi.toml").is_file():
        raise ProjectRefused(
            f"{project}: no mlapi.toml here (write one with: python -m app init <data file> --target <column>)"
        )
    env = {**os.environ, "MLAPI_MODEL_PROJECT": str(project.resolve()), "MLAPI_DATA_DIR": tempfile.gettempdir()}
    with tempfile.TemporaryDirectory(prefix="mlapi-check-") as private:  # 0700, removed with the credentials
        if data_credentials is not None:
            credentials = Path(private) / "data-credentials"
            credentials.write_text(data_credentials)
            env["MLAPI_DATA_CREDENTIALS_FILE"] = str(credentials)
        result = subprocess.run(
            [sys.executable, "-m", "app", "check"], cwd=PROJECT_DIR, env=env, capture_output=True, text=True
        )
    if result.returncode != 0:
        raise ProjectRefused(result.stderr.strip().removeprefix("error: "))


def data_needs_credentials(project: Path) -> bool:
    """Whether the (checked) project's data is an s3:// object, which the stack fetches with credentials of its own."""
    try:
        data = tomllib.loads((project / "mlapi.toml").read_text())["model"]["data"]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError):
        return False  # the app's check names what is wrong with the file
    return str(data).lower().startswith("s3://")
