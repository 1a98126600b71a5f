"""What tests of model projects share: a copy of the penguins example with the user's own code and keys added, a
penguin with a gap to ask about, and `python -m app` run on a project as the image build runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from app.project import PROJECT_FILE

PROJECT_DIR = Path(__file__).resolve().parents[2]
EXAMPLES = PROJECT_DIR / "examples"
DATA_LINE = 'data = "data/penguins.csv"\n'
# A Chinstrap-like bird whose sex is not known.
PENGUIN = {
    "island": "Dream",
    "bill_length_mm": 49.0,
    "bill_depth_mm": 19.5,
    "flipper_length_mm": 196,
    "body_mass_g": 3800,
    "sex": None,
    "year": 2008,
}


def penguins_with_code(directory: Path, files: dict[str, str], keys: str) -> Path:
    """``examples/penguins`` copied to ``directory``, with ``files`` (name → text) written into it and ``keys``
    (lines of the [model] table) added after its data key."""
    shutil.copytree(EXAMPLES / "penguins", directory)
    for name, text in files.items():
        (directory / name).write_text(text)
    text = (directory / PROJECT_FILE).read_text()
    (directory / PROJECT_FILE).write_text(text.replace(DATA_LINE, DATA_LINE + keys))
    return directory


def app_command(project: Path, *args: str, packages: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m app <args>`` on ``project`` in its own process (``packages``: put on its import path)."""
    environment = {
        "PATH": os.environ["PATH"],
        "MLAPI_MODEL_PROJECT": str(project),
        "MLAPI_DATA_DIR": str(project.parent / "data"),
        **({"PYTHONPATH": str(packages)} if packages else {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "app", *args], env=environment, cwd=PROJECT_DIR, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
