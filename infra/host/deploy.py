"""Pure pieces of the deploy that are not containers: firewall rules, SSH transport options, smoke command.

Kept apart from the Pulumi components so tests (and the VM stand-in) use exactly what `pulumi up` uses.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from infra.spec.inputs import WORLD


@dataclass(frozen=True)
class FirewallRule:
    description: str
    protocol: str  # tcp | icmp
    port: str | None
    source_ips: tuple[str, ...]
    direction: str = "in"


def firewall_rules(ssh_allowed_cidrs: tuple[str, ...], *, public_web: bool = True) -> tuple[FirewallRule, ...]:
    """Inbound 80/443 from anywhere, 22 from the allowed CIDRs, ICMP; everything else is dropped.

    Docker-published ports bypass a host firewall (docker/for-linux#690), so this cloud firewall is the boundary.
    ``public_web=False`` (a load balancer in front): no 80/443 on the public interface; the load balancer reaches
    Traefik over the private network, which the cloud firewall does not filter.
    """
    web = (
        FirewallRule("HTTP (ACME http-01 and redirect to HTTPS)", "tcp", "80", WORLD),
        FirewallRule("HTTPS", "tcp", "443", WORLD),
    )
    return (
        *(web if public_web else ()),
        FirewallRule("SSH (deploys and operators)", "tcp", "22", tuple(ssh_allowed_cidrs)),
        FirewallRule("ICMP (ping, path MTU discovery)", "icmp", None, WORLD),
    )


def docker_ssh_options(host_key: str, identity_file: str | None) -> list[str]:
    """Options for the ssh:// transport of the Docker provider. The host key comes from the program's state (it made
    the key), handed to ssh by KnownHostsCommand: no known_hosts file on any machine, and nothing trusted on first
    use. ``%H`` is whatever host ssh looks up, so the pin survives a new IP; only the key is trusted."""
    options = [
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        f"KnownHostsCommand=/bin/echo %H {host_key.strip()}",
        "-o",
        "ConnectTimeout=15",
        "-o",
        "ServerAliveInterval=15",
    ]
    if identity_file:
        # As configured (e.g. ~/.ssh/id_ed25519): ssh expands "~", so no home path of one machine is in the inputs.
        options += ["-o", "IdentitiesOnly=yes", "-i", identity_file]
    return options


def platform_for(server_type: str) -> str:
    """Hetzner's cax* types are Ampere (arm64); every other type is x86-64."""
    return "linux/arm64" if server_type.lower().startswith("cax") else "linux/amd64"


# GB of memory per Hetzner server type (hetzner.com/cloud, late 2026). A type not listed is sized as the smallest
# (2 GB): its containers' memory limits are then lower than they could be, never more than the server has.
SERVER_MEMORY_GB = {
    **{name: gb for name, gb in (("cx22", 4), ("cx32", 8), ("cx42", 16), ("cx52", 32))},
    **{name: gb for name, gb in (("cx23", 4), ("cx33", 8), ("cx43", 16), ("cx53", 32))},
    **{name: gb for name, gb in (("cpx11", 2), ("cpx21", 4), ("cpx31", 8), ("cpx41", 16), ("cpx51", 32))},
    **{name: gb for name, gb in (("cax11", 4), ("cax21", 8), ("cax31", 16), ("cax41", 32))},
    **{name: gb for name, gb in (("ccx13", 8), ("ccx23", 16), ("ccx33", 32), ("ccx43", 64), ("ccx53", 128))},
}
SMALLEST_SERVER_GB = 2


def server_memory_mb(server_type: str) -> int:
    return SERVER_MEMORY_GB.get(server_type.lower(), SMALLEST_SERVER_GB) * 1024


def smoke_command(domain: str, ip: str, *, staging: bool, attempts: int = 60, delay_s: int = 10) -> str:
    """The post-deploy check `pulumi up` runs locally (see infra/ops/smoke.py): it dials the server's own IP with the
    domain as SNI and Host, so a resolver cache on the operator's machine cannot make it test the old server."""
    command = [
        "python3",
        "-m",
        "infra.ops.smoke",
        "--url",
        f"https://{domain}/health",
        "--connect-to",
        ip,
        "--attempts",
        str(attempts),
        "--delay",
        str(delay_s),
    ]
    if staging:
        command.append("--insecure")  # staging certificates chain to a root no trust store has
    return shlex.join(command)
