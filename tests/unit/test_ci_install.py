""".ci/install decides by the engine, not the client: the real script runs against shims of apt-get, docker and
dockerd (a PATH holding only them and the few tools it uses), so the real machine is never touched."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.shims import shim_dir

SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "install"
TOOLS = ("date", "seq", "sleep", "tail", "nohup", "cat", "touch", "rm", "chmod")

APT_GET = """#!/bin/sh
echo "apt-get $*" >> "$SHIMS/calls"
case "$*" in
  *install*docker.io*) printf '#!/bin/sh\\necho dockerd >> "$SHIMS/calls"\\ntouch "$SHIMS/running"\\n' \
    > "$SHIMS/bin/dockerd"; chmod 755 "$SHIMS/bin/dockerd" ;;
esac
"""
DOCKER = """#!/bin/sh
[ "$1" = info ] && [ -e "$SHIMS/running" ]
"""
DOCKERD = """#!/bin/sh
echo dockerd >> "$SHIMS/calls"
touch "$SHIMS/running"
"""


def machine(tmp_path: Path, *, engine_installed: bool, engine_running: bool) -> Path:
    """A machine of our kind in miniature: a docker client always; dockerd and a running engine as asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool) or pytest.fail(f"{tool} is not on this machine"))
    shim_dir(bin_dir, {"apt-get": APT_GET, "docker": DOCKER, **({"dockerd": DOCKERD} if engine_installed else {})})
    if engine_running:
        (tmp_path / "running").touch()
    (tmp_path / "calls").touch()
    return tmp_path


def install(shims: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    env = {"PATH": str(shims / "bin"), "SHIMS": str(shims), "CI_LOG_DIR": str(shims)}
    done = subprocess.run(["/bin/bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    return done, (shims / "calls").read_text().splitlines()


def installs(calls: list[str]) -> list[str]:
    [line] = [call for call in calls if call.startswith("apt-get install")]
    return line.split()


def test_a_client_without_an_engine_gets_docker_io_and_a_started_daemon(tmp_path: Path) -> None:
    done, calls = install(machine(tmp_path, engine_installed=False, engine_running=False))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "docker.io" in installs(calls)
    assert calls.count("dockerd") == 1
    assert "no dockerd on this machine" in done.stdout


def test_an_installed_but_stopped_engine_is_started_not_reinstalled(tmp_path: Path) -> None:
    done, calls = install(machine(tmp_path, engine_installed=True, engine_running=False))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "docker.io" not in installs(calls) and "pebble" in installs(calls)
    assert calls.count("dockerd") == 1


def test_a_running_engine_is_left_alone(tmp_path: Path) -> None:
    done, calls = install(machine(tmp_path, engine_installed=True, engine_running=True))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "docker.io" not in installs(calls)
    assert "dockerd" not in calls
    assert "already answers; leaving it alone" in done.stdout
