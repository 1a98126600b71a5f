"""Stand-ins for the tools a host script calls (docker, curl, apt-get, ip…): small shell scripts on a PATH of the
test's own, so the real script runs without touching the machine."""

from __future__ import annotations

from pathlib import Path


def shim_dir(directory: Path, scripts: dict[str, str]) -> Path:
    """``directory`` (created) with one executable per entry; a body without a shebang runs under /bin/sh."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        (directory / name).write_text(body if body.startswith("#!") else f"#!/bin/sh\n{body}\n")
        (directory / name).chmod(0o755)
    return directory


def installed_tool(name: str, package: str) -> str:
    """The path of a real tool the tests run (shellcheck, promtool…); failing, not skipping, when it is missing:
    .ci/install installs it."""
    import shutil

    import pytest

    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: .ci/install installs it (apt-get install {package})")
    return path
