"""Pure pieces of the deploy that are not containers: firewall rules, SSH transport options, smoke command.

Kept apart from the Pulumi components so tests (and the VM stand-in) use exactly what `pulumi up` uses.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from infra.config import WORLD


@dataclass(frozen=True)
class FirewallRule:
    description: str
    protocol: str  # tcp | icmp
    port: str | None
    source_ips: tuple[str, ...]
    direction: str = "in"


def firewall_rules(ssh_allowed_cidrs: tuple[str, ...]) -> tuple[FirewallRule, ...]:
    """Inbound 80/443 from anywhere, 22 from the allowed CIDRs, ICMP; everything else is dropped.

    Docker-published ports bypass a host firewall (docker/for-linux#690), so this cloud firewall is the boundary.
    """
    return (
        FirewallRule("HTTP (ACME http-01 and redirect to HTTPS)", "tcp", "80", WORLD),
        FirewallRule("HTTPS", "tcp", "443", WORLD),
        FirewallRule("SSH (deploys and operators)", "tcp", "22", tuple(ssh_allowed_cidrs)),
        FirewallRule("ICMP (ping, path MTU discovery)", "icmp", None, WORLD),
    )


def docker_ssh_options(known_hosts: Path, identity_file: str | None) -> list[str]:
    """Options for the ssh:// transport of the Docker provider: the host key is pinned, never skipped."""
    options = [
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "ConnectTimeout=15",
        "-o",
        "ServerAliveInterval=15",
    ]
    if identity_file:
        options += ["-o", "IdentitiesOnly=yes", "-i", str(Path(identity_file).expanduser())]
    return options


# Writes the host key that the readiness step printed into a known_hosts file of this stack, and prints its path:
# the Docker provider's host is derived from that output, so it cannot connect before the key is pinned.
KNOWN_HOSTS_SCRIPT = (
    'umask 077; mkdir -p "$(dirname "$KNOWN_HOSTS")" && '
    'printf "%s %s\\n" "$HOST_IP" "$HOST_KEY" > "$KNOWN_HOSTS" && printf "%s" "$KNOWN_HOSTS"'
)


def smoke_command(domain: str, *, staging: bool, attempts: int = 60, delay_s: int = 10) -> str:
    """The post-deploy check `pulumi up` runs locally (see infra/smoke.py)."""
    command = [
        "python3",
        "-m",
        "infra.smoke",
        "--url",
        f"https://{domain}/health",
        "--attempts",
        str(attempts),
        "--delay",
        str(delay_s),
    ]
    if staging:
        command.append("--insecure")  # staging certificates chain to a root no trust store has
    return shlex.join(command)
