"""The model image installs a hashed lock (issue 24): every package of app/requirements.txt at its pinned version,
every transitive one pinned too, each with its hashes, installed with --require-hashes on both of the Dockerfile's
paths (PyPI on the VM, the host's wheels locally)."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

APP = Path(__file__).resolve().parents[2] / "app"


def locked() -> dict[str, tuple[str, list[str]]]:
    """name → (version, hashes) from the lock file's entries (a line, its `\\`-continued hashes)."""
    entries: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=\S)", (APP / "requirements.lock").read_text()):
        if block.startswith("#") or not block.strip():
            continue
        first = block.split("\\", 1)[0].strip()
        name, version = first.split(";")[0].strip().split("==")
        entries[canonicalize_name(name)] = (version, re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return entries


def test_every_locked_package_is_pinned_with_hashes() -> None:
    entries = locked()
    assert len(entries) > 20, "the lock holds the whole tree, not only the top level"
    unhashed = [name for name, (_, hashes) in entries.items() if not hashes]
    assert unhashed == []


def test_the_lock_matches_what_the_service_asks_for() -> None:
    """A pin edited in app/requirements.txt without `make app/requirements.lock` fails here, naming it."""
    entries = locked()
    for line in (APP / "requirements.txt").read_text().splitlines():
        text = line.split("#")[0].strip()
        if not text:
            continue
        wanted = Requirement(text)
        name = canonicalize_name(wanted.name)
        assert name in entries, f"{wanted.name} is not in app/requirements.lock: run `make app/requirements.lock`"
        version = entries[name][0]
        assert wanted.specifier.contains(version, prereleases=True), (
            f"app/requirements.lock has {wanted.name}=={version}, app/requirements.txt asks {wanted.specifier}: "
            "run `make app/requirements.lock`"
        )


def test_the_image_installs_only_the_hashed_lock() -> None:
    dockerfile = (APP / "Dockerfile").read_text()
    installs = re.findall(r"pip install [^;\n]*", dockerfile)
    assert len(installs) == 2  # from the host's wheels, and from PyPI
    for install in installs:
        assert "--require-hashes" in install and "-r requirements.lock" in install, install
    assert "requirements.txt" not in dockerfile.split("FROM", 2)[1]  # the build stage
