"""shellcheck on every shell script the program sends to a host: the remote and local commands of three stacks (one VM,
backups on, workers with a load balancer and DNS-01), the scripts they install (embedded base64), and the scripts
and commands in each server's user-data."""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.program import BACKUP_CONFIG, LOCAL, REMOTE, SERVER, WORKERS
from tests.support.pulumi_harness import VALID_CONFIG, run_program
from tests.support.shims import installed_tool

CONFIGS = {
    "one VM": VALID_CONFIG,
    "backups": BACKUP_CONFIG,
    "workers": {**WORKERS, "loadBalancer": "true", "acmeChallenge": "dns"},
}
# SC2016: text in single quotes meant for another shell (`sh -c '...'`, `python3 -c '...'`) expands there, on purpose.
# SC1091: the backup credentials file is sourced at run time; it does not exist where the check runs.
EXCLUDED = "SC2016,SC1091"
EMBEDDED = re.compile(r"(?:printf %s|echo) ([A-Za-z0-9+/=]{40,})")


def scripts_of(config: dict[str, str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for resource in run_program(config).resources:
        if resource.typ in (REMOTE, LOCAL):
            for step in ("create", "update", "delete"):
                text = resource.inputs.get(step)
                if isinstance(text, str) and text.strip():
                    found[f"{resource.name} {step}"] = text
        elif resource.typ == SERVER:
            document = yaml.safe_load(resource.inputs["userData"])
            for entry in document.get("write_files", []):
                content = entry.get("content", "")
                if entry.get("encoding") in ("b64", "base64"):
                    content = base64.b64decode(content).decode()
                found[f"{resource.name} user-data {entry['path']}"] = content
            commands = [c if isinstance(c, str) else " ".join(c) for c in document.get("runcmd", [])]
            found[f"{resource.name} user-data runcmd"] = "\n".join(commands) + "\n"
    for name, text in list(found.items()):  # files the commands install, embedded as base64: the scripts among them
        for index, blob in enumerate(EMBEDDED.findall(text)):
            content = base64.b64decode(blob).decode(errors="replace")
            if content.startswith("#!"):
                found[f"{name} file {index}"] = content
    return {name: text for name, text in found.items() if "user-data /" not in name or text.startswith("#!")}


@pytest.fixture(scope="module")
def shellcheck() -> str:
    return installed_tool("shellcheck", "shellcheck")


def test_the_collection_finds_the_scripts_that_matter() -> None:
    scripts = scripts_of(CONFIGS["backups"])
    names, texts = "\n".join(scripts), "\n".join(scripts.values())
    assert "host-setup create" in names and "user-data runcmd" in names
    assert "mlapi-backup [check]" in texts and "mlapi-restore" in texts  # the installed backup scripts, decoded


@pytest.mark.parametrize("label", CONFIGS)
def test_every_script_passes_shellcheck(label: str, shellcheck: str, tmp_path: Path) -> None:
    findings = []
    for index, (name, text) in enumerate(scripts_of(CONFIGS[label]).items()):
        shell = "bash" if text.startswith("#!/bin/bash") else "sh"
        path = tmp_path / f"{index}.sh"
        path.write_text(text)
        result = subprocess.run(
            [shellcheck, "--shell", shell, "--exclude", EXCLUDED, "--format", "gcc", str(path)],
            capture_output=True,
            text=True,
        )
        findings += [f"{name}: {line.split(': ', 1)[1]}" for line in result.stdout.splitlines()]
    assert findings == []


def test_every_script_file_in_the_repository_passes_shellcheck(shellcheck: str) -> None:
    """Scripts kept as files: run on a host as they are (infra/ops/scripts/status.sh), and CI's own."""
    root = Path(__file__).resolve().parents[2]
    files = subprocess.run(["git", "-C", str(root), "ls-files", "*.sh"], capture_output=True, text=True).stdout.split()
    files += [str(p.relative_to(root)) for p in (root / "infra").rglob("*.sh")]  # also before they are committed
    files += [".ci/run", ".ci/install"]
    assert "infra/ops/scripts/status.sh" in files
    result = subprocess.run(
        [shellcheck, "--exclude", EXCLUDED, "--format", "gcc", *sorted(set(files))],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert result.returncode == 0, result.stdout
