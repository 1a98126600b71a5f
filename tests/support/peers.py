"""The peers' own V2 clients that cannot live in this venv: KServe's, in .venv-clients (`make test` makes it)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parents[2]
CLIENTS_PYTHON = PROJECT_DIR / ".venv-clients" / "bin" / "python"
KSERVE_CLIENT = PROJECT_DIR / "tests" / "support" / "kserve_client.py"


def kserve_infer(request: dict[str, Any]) -> dict[str, Any]:
    """One inference (and the health and readiness calls) by kserve.InferenceRESTClient; see kserve_client.py."""
    assert CLIENTS_PYTHON.exists(), (
        "KServe's client venv is missing: make .venv-clients/.installed (make test makes it)"
    )
    result = subprocess.run(
        [str(CLIENTS_PYTHON), str(KSERVE_CLIENT)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)
