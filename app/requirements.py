"""A model project's extra packages (``model.requirements``): each pinned exactly, checked against what the service
already runs, and installed into the model image beside (never over) the service's own packages.

The rules, each refused with its reason: every line is ``name==version`` (no range, wildcard, URL, path, editable
or option other than ``--hash``); hashes on every line or on none (pip's hash-checking mode is all or nothing); no
package the service runs at another version (it would replace what scikit-learn, MAPIE and skops were tested with).
Packages are installed without their dependencies: the file is the lock, and ``pip check`` at build time names any
dependency it lacks."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

WHEELS_DIR = ".wheels"  # in a project's build context: wheels fetched on the host (the local stack builds offline)


class RequirementsError(ValueError):
    """The requirements file cannot be installed as it is; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Pin:
    name: str  # canonical (lower case, dashes)
    version: str
    hashes: tuple[str, ...]
    line: int

    @property
    def text(self) -> str:
        return f"{self.name}=={self.version}"


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) per requirement, with backslash continuations joined and comments dropped."""
    lines: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined = (pending + line).strip()
        pending = ""
        if joined:
            lines.append((start, joined))
    if pending.strip():
        lines.append((start, pending.strip()))
    return lines


def parse_pins(text: str, where: str) -> list[Pin]:
    """Every requirement of a requirements file, each an exact pin; RequirementsError names the line otherwise."""
    pins: list[Pin] = []
    for number, line in logical_lines(text):
        at = f"{where} line {number}"
        text, dashes, options = line.partition(" --")  # the requirement (markers and all), then its options
        words = (dashes + options).split()
        hashes = tuple(word.removeprefix("--hash=") for word in words if word.startswith("--hash="))
        others = [word for word in words if not word.startswith("--hash=")]
        if text.startswith("-") or others:
            raise RequirementsError(
                f"{at}: {line!r}: only 'name==version' lines (with --hash=sha256:… if you like) are installed; "
                "options, includes, indexes and editables are not"
            )
        try:
            requirement = Requirement(text)
        except InvalidRequirement as exc:
            raise RequirementsError(f"{at}: {text!r} is not a requirement ({exc})") from None
        specifiers = list(requirement.specifier)
        if (
            requirement.url
            or len(specifiers) != 1
            or specifiers[0].operator not in ("==", "===")
            or "*" in str(specifiers[0].version)
        ):
            raise RequirementsError(
                f"{at}: {text!r} is not an exact pin: write {requirement.name}==<version> (a range or a URL "
                "would install whatever is newest on the day the image is built)"
            )
        if requirement.extras:
            raise RequirementsError(
                f"{at}: {text!r} has extras, which install more packages unpinned: list each package they bring "
                "with its own pin"
            )
        if any(not value.startswith("sha256:") for value in hashes):
            raise RequirementsError(f"{at}: hashes must be sha256 (--hash=sha256:<hex>)")
        pins.append(Pin(canonicalize_name(requirement.name), specifiers[0].version, hashes, number))
    hashed = [pin for pin in pins if pin.hashes]
    if hashed and len(hashed) != len(pins):
        unhashed = [pin.text for pin in pins if not pin.hashes]
        raise RequirementsError(
            f"{where}: some lines have --hash and {unhashed} do not: pip checks hashes on every line or on none"
        )
    return pins


SERVICE_LOCK = Path(__file__).with_name("requirements.lock")  # copied into the image beside the code


def service_versions(lock: Path = SERVICE_LOCK) -> dict[str, str]:
    """What the service runs, from its lock (the same in the image and in a checkout): canonical name → version."""
    versions = {}
    for _, line in logical_lines(lock.read_text()):
        requirement = Requirement(line.split()[0])
        versions[canonicalize_name(requirement.name)] = next(iter(requirement.specifier)).version
    return versions


def to_install(pins: list[Pin], installed: dict[str, str], where: str) -> list[Pin]:
    """The pins not already installed at the same version; one that names another version of a package the service
    runs is refused."""
    conflicts = [f"{pin.text} (the service runs {installed[pin.name]})" for pin in pins
                 if pin.name in installed and installed[pin.name] != pin.version]  # fmt: skip
    if conflicts:
        raise RequirementsError(
            f"{where}: {conflicts}: the service's own packages keep their versions (app/requirements.lock); drop "
            "these lines or pin the versions the service runs"
        )
    return [pin for pin in pins if pin.name not in installed]


def install(pins: list[Pin], target: Path, wheels: Path | None, where: str) -> None:
    """pip install of ``pins`` into ``target`` (no dependencies: the file is the lock), offline from ``wheels`` if
    given, then ``pip check`` over the service's packages and these."""
    target.mkdir(parents=True, exist_ok=True)
    if not pins:
        return
    lock = target / "requirements.txt"  # what was installed, kept in the image
    lock.write_text("".join(f"{pin.text}{''.join(f' --hash={h}' for h in pin.hashes)}\n" for pin in pins))
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-cache-dir",
        "--target",
        str(target),
    ]
    command += ["--require-hashes"] if pins[0].hashes else []
    command += ["--no-index", "--find-links", str(wheels)] if wheels else []
    result = subprocess.run([*command, "-r", str(lock)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RequirementsError(f"{where}: pip install failed:\n{(result.stdout + result.stderr)[-3000:]}")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    checked = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False, env=environment
    )
    if checked.returncode != 0:
        raise RequirementsError(
            f"{where}: installed, but a package lacks what it needs:\n{checked.stdout.strip()}\npin each missing "
            "package in the requirements file too (it is installed without dependencies: it is the lock)"
        )
