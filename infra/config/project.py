"""The model project an operator names (the modelProject key, `make local-up MODEL=`): found, and checked by the app
itself (`python -m app check`), before any image is built or anything deployed."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
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


def check_project(project: Path) -> None:
    """The app's own check of a model project: its schema against its data, its pipeline code called once."""
    if not (project / "mlapi.toml").is_file():
        raise ProjectRefused(
            f"{project}: no mlapi.toml here (write one with: python -m app init <data file> --target <column>)"
        )
    result = subprocess.run(
        [sys.executable, "-m", "app", "check"],
        cwd=PROJECT_DIR,
        env={**os.environ, "MLAPI_MODEL_PROJECT": str(project.resolve()), "MLAPI_DATA_DIR": tempfile.gettempdir()},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ProjectRefused(result.stderr.strip().removeprefix("error: "))
