"""Where `mlapi` runs its commands: the stack's manager over SSH, with the host key pinned from the stack's own outputs
(never trusted on first use), or this machine for the local stack. Both run the same host commands (the Docker CLI,
the data root), so every `mlapi` command prints the same locally and against a stack."""

from __future__ import annotations

import json
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from infra.host.deploy import docker_ssh_options
from infra.spec.stack import MODEL_SERVICE

STACK_OUTPUTS = ("url", "ipv4", "hostKey", "dataRoot")


class TargetError(RuntimeError):
    """The stack cannot be reached or asked; the message says what to do."""


@dataclass(frozen=True)
class Target:
    """A stack to operate: its URL, the address its edge answers on, and how to run a command on its manager."""

    name: str
    url: str
    edge_address: str  # dialed for the certificate; the URL's name is sent as SNI
    edge_port: int
    data_root: str
    ssh: tuple[str, ...] = ()  # ssh's arguments up to the command; empty: this machine

    @property
    def domain(self) -> str:
        return urlsplit(self.url).hostname or ""

    def argv(self, command: list[str], tty: bool = False) -> list[str]:
        """The local argv that runs ``command`` on the manager."""
        if not self.ssh:
            return command
        return ["ssh", *(["-t"] if tty else []), *self.ssh, shlex.join(command)]

    def run(
        self, command: list[str], *, input: bytes | None = None, stdout: IO[bytes] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        """Run ``command`` on the manager; its output captured, or written to ``stdout`` as it comes."""
        try:
            return subprocess.run(
                self.argv(command),
                input=input,
                stdout=stdout if stdout is not None else subprocess.PIPE,
                stderr=subprocess.PIPE,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError as exc:
            raise TargetError(f"{exc.filename} is not installed here ({self.name})") from exc
        except subprocess.TimeoutExpired as exc:
            raise TargetError(f"{shlex.join(command)} on {self.name} took longer than {timeout:.0f} s") from exc

    def attach(self, command: list[str], tty: bool = False) -> int:
        """Run ``command`` on the manager with this terminal attached (follow logs, a shell); its exit code."""
        return subprocess.run(self.argv(command, tty=tty), check=False).returncode

    def model_container(self) -> str:
        """A running replica of the model on the manager (the one `docker exec` reaches)."""
        service = f"label=com.docker.swarm.service.name={MODEL_SERVICE}"
        found = self.run(["docker", "ps", "-q", "--filter", service, "--filter", "status=running"])
        containers = found.stdout.decode().split()
        if found.returncode != 0 or not containers:
            reason = found.stderr.decode().strip() or "no replica is running there"
            raise TargetError(f"no running {MODEL_SERVICE} replica on {self.name}: {reason}")
        return containers[0]


def stack_target(outputs: dict[str, str], identity_file: str | None, stack: str) -> Target:
    """The target of a Pulumi stack from its outputs (`pulumi stack output --json`)."""
    missing = [key for key in STACK_OUTPUTS if not outputs.get(key)]
    if missing:
        raise TargetError(
            f"stack {stack}: outputs {', '.join(missing)} are missing; run `pulumi up` with this version of the "
            "program (it exports them), then try again"
        )
    options = [*docker_ssh_options(outputs["hostKey"], identity_file), "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
    return Target(
        name=f"stack {stack} (root@{outputs['ipv4']})",
        url=outputs["url"],
        edge_address=outputs["ipv4"],
        edge_port=443,
        data_root=outputs["dataRoot"],
        ssh=(*options, f"root@{outputs['ipv4']}"),
    )


def pulumi_outputs(stack: str | None, cwd: Path) -> tuple[str, dict[str, str]]:
    """The stack's name and outputs, read with the Pulumi CLI (the selected stack unless one is named)."""
    named = ["--stack", stack] if stack else []
    try:
        listed = subprocess.run(
            ["pulumi", "stack", "output", "--json", *named], cwd=cwd, capture_output=True, text=True, check=False
        )
        name = (
            stack
            or subprocess.run(
                ["pulumi", "stack", "--show-name"], cwd=cwd, capture_output=True, text=True, check=False
            ).stdout.strip()
        )
    except FileNotFoundError as exc:
        raise TargetError(
            "the Pulumi CLI is not installed: install it, or pass --outputs FILE (a saved `pulumi stack output "
            "--json`), or use --local for the local stack"
        ) from exc
    if listed.returncode != 0:
        raise TargetError(f"`pulumi stack output --json` failed: {listed.stderr.strip()}")
    return name or "(selected)", json.loads(listed.stdout)


def pulumi_identity_file(stack: str | None, cwd: Path) -> str | None:
    """The operator's SSH key as configured (sshPrivateKeyPath); None: ssh's own defaults."""
    named = ["--stack", stack] if stack else []
    try:
        found = subprocess.run(
            ["pulumi", "config", "get", "sshPrivateKeyPath", *named], cwd=cwd, capture_output=True, text=True
        )
    except FileNotFoundError:
        return None
    return found.stdout.strip() or None if found.returncode == 0 else None
