"""``python -m infra.config``: the configuration reference table. ``--write`` puts it into docs/configuration.md in
place of the table there (the prose around it stays); a test keeps the two equal."""

import sys
from pathlib import Path

from infra.config.keys import reference_table

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

if sys.argv[1:] == ["--write"]:
    lines = DOCUMENT.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("| key | required |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    DOCUMENT.write_text("".join(lines[:start]) + reference_table() + "".join(lines[end:]))
else:
    sys.stdout.write(reference_table())
