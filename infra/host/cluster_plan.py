"""Growing past one VM, the pure part: the private network's addresses, the worker firewall, and the shell steps that
move the swarm onto the private network, join a worker, and drain one away. The Pulumi component
(infra/program/cluster.py) and the two-node test run exactly these.

Swarm's own ports (2377/tcp management, 7946/tcp+udp gossip, 4789/udp VXLAN) listen on the private address only
(advertise, listen and data-path address), and no cloud firewall rule opens them: Hetzner's cloud firewalls filter
the public interface, and the private network carries only this stack's servers (README: Growing past one VM).
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass

from infra.host.deploy import FirewallRule
from infra.host.setup import installed_script
from infra.spec.inputs import WORLD
from infra.spec.stack import MODEL_SERVICE, MODEL_UID, NODE_LABEL, SEED_MARKER, SWARM_ADVERTISE_ADDR, SWARM_LISTEN_ADDR

PRIVATE_NETWORK = "10.44.0.0/16"
PRIVATE_SUBNET = "10.44.1.0/24"
MANAGER_PRIVATE_IP = "10.44.1.2"
LOAD_BALANCER_PRIVATE_IP = "10.44.1.5"
FIRST_WORKER_HOST = 10  # workers are 10.44.1.10, .11, …
SWARM_PORT = 2377
# What swarm needs between nodes: on the private network only (nothing in any cloud firewall rule).
SWARM_PORTS = (("2377", "tcp"), ("7946", "tcp"), ("7946", "udp"), ("4789", "udp"))
MANAGER_NODE = "manager"
DRAIN_TIMEOUT_S = 300
NETWORK_ZONES = {
    "fsn1": "eu-central",
    "nbg1": "eu-central",
    "hel1": "eu-central",
    "ash": "us-east",
    "hil": "us-west",
    "sin": "ap-southeast",
}


def network_zone(location: str) -> str:
    """Hetzner's network zone of a location (a subnet and its servers must share one)."""
    return NETWORK_ZONES[location]


def seed_marker_path(data_root: str) -> str:
    return f"{data_root.rstrip('/')}/model/{SEED_MARKER}"


def worker_private_ip(index: int) -> str:
    address = ipaddress.ip_address(MANAGER_PRIVATE_IP) + (FIRST_WORKER_HOST - 2) + index
    if address not in ipaddress.ip_network(PRIVATE_SUBNET):
        raise ValueError(f"worker {index} has no address in {PRIVATE_SUBNET}")
    return str(address)


def worker_name(stack_name: str, index: int) -> str:
    """The worker's server name and hostname, which is also its swarm node's hostname and placement label."""
    return f"{stack_name}-worker-{index + 1}"


def worker_firewall_rules(ssh_allowed_cidrs: tuple[str, ...]) -> tuple[FirewallRule, ...]:
    """A worker serves nothing publicly: Traefik on the manager reaches its tasks over the overlay. SSH (deploys,
    operators) and ICMP only; everything else on the public interface is dropped."""
    return (
        FirewallRule("SSH (deploys and operators)", "tcp", "22", tuple(ssh_allowed_cidrs)),
        FirewallRule("ICMP (ping, path MTU discovery)", "icmp", None, WORLD),
    )


@dataclass(frozen=True)
class SwarmAddress:
    """Where the manager's swarm listens: loopback alone, or the private network once there are workers."""

    advertise: str
    listen: str
    data_path: str | None = None


LOOPBACK = SwarmAddress(SWARM_ADVERTISE_ADDR, SWARM_LISTEN_ADDR)
PRIVATE = SwarmAddress(MANAGER_PRIVATE_IP, f"{MANAGER_PRIVATE_IP}:{SWARM_PORT}", MANAGER_PRIVATE_IP)


def render_swarm_address(target: SwarmAddress, seed_marker: str | None = None) -> str:
    """Move the manager's swarm to ``target`` if it is elsewhere (infra/host/scripts/swarm-address.sh): services,
    secrets, networks and node labels are kept, running tasks are not restarted; a second `up` does nothing.
    ``seed_marker``: a file put in the model directory on the data volume: the replicas that see it (this node's)
    seed the shared registry, importing this node's models (app/service.py)."""
    settings = {
        "ADVERTISE": target.advertise,
        "LISTEN": target.listen,
        "DATA_PATH": target.data_path or "",
        "WAIT": "" if target.advertise == SWARM_ADVERTISE_ADDR else target.advertise,
        "NODE_LABEL": NODE_LABEL,
        "MANAGER_NODE": MANAGER_NODE,
        "SEED_MARKER": seed_marker or "",
        "MODEL_UID": str(MODEL_UID),
    }
    return installed_script("swarm address", settings, "cluster-common.sh", "swarm-address.sh")


JOIN_TOKEN_COMMAND = "docker swarm join-token --quiet worker"  # noqa: S105 (prints the token; a secret output)


JOINED_TOKEN_FILE = "/var/lib/mlapi/swarm-join-token.sha256"  # noqa: S105 (a digest, not the token)


def render_worker_join(worker_ip: str, manager_ip: str = MANAGER_PRIVATE_IP) -> str:
    """On a worker: join the manager's swarm with the token from stdin, print the node ID
    (infra/host/scripts/worker-join.sh)."""
    settings = {
        "WORKER_IP": worker_ip,
        "MANAGER_IP": manager_ip,
        "SWARM_PORT": str(SWARM_PORT),
        "JOINED_TOKEN_FILE": JOINED_TOKEN_FILE,
    }
    return installed_script("worker join", settings, "cluster-common.sh", "worker-join.sh")


NODE_ID = re.compile(r"[a-z0-9]{25}")  # what `docker info --format {{.Swarm.NodeID}}` prints


def refused_node_id(printed: str) -> str | None:
    """A script that stops with the reason when a worker printed something other than a swarm node ID (a
    compromised worker must not put text into the manager's root shell); None for a node ID."""
    if NODE_ID.fullmatch(printed):
        return None
    reason = f"the worker printed {printed[:80]!r} where a swarm node ID ([a-z0-9]{{25}}) belongs; nothing was run"
    return f"echo {shlex.quote(reason)} >&2\nexit 1\n"


def render_node_ready(node_id: str, label: str, timeout_s: int = 120) -> str:
    """On the manager: wait until the joined node is Ready, then label it so the replicas spread onto it."""
    refused = refused_node_id(node_id)
    if refused:
        return refused
    settings = {"NODE": node_id, "LABEL": label, "NODE_LABEL": NODE_LABEL, "TIMEOUT_S": str(timeout_s)}
    return installed_script("node ready", settings, "node-ready.sh")


def render_node_drain(node_id: str, timeout_s: int = DRAIN_TIMEOUT_S) -> str:
    """On the manager, before a worker goes (`workers` lowered, or the worker replaced): drain it, wait until its
    replicas run elsewhere, then remove the node (infra/host/scripts/node-drain.sh)."""
    refused = refused_node_id(node_id)
    if refused:
        return refused
    settings = {"NODE": node_id, "TIMEOUT_S": str(timeout_s), "MODEL_SERVICE": MODEL_SERVICE}
    return installed_script("node drain", settings, "node-drain.sh")


# On the worker, after the manager removed it: leave (the server is usually deleted right after).
WORKER_LEAVE = "docker swarm leave --force >/dev/null 2>&1 || true\necho left the swarm\n"
