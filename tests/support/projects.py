"""What tests of model projects share: a copy of the penguins example with the user's own code and keys added, and a
penguin with a gap to ask about."""

from __future__ import annotations

import shutil
from pathlib import Path

from app.project import PROJECT_FILE

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
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
