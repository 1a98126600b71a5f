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
from infra.host.setup import as_owner, refuse_link
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


def _wait_for_address(address: str, what: str, timeout_s: int = 120) -> str:
    return (
        f"i=0; while ! ip -4 -o addr show | grep -q ' inet {address}/' && [ $i -lt {timeout_s} ]; do "
        "sleep 1; i=$((i+1)); done\n"
        f"ip -4 -o addr show | grep -q ' inet {address}/' || {{ echo '{what}: {address} is on no interface after "
        f"{timeout_s} s (is the server attached to the private network?)' >&2; exit 1; }}\n"
    )


def render_swarm_address(target: SwarmAddress, seed_marker: str | None = None) -> str:
    """Move the manager's swarm to ``target`` if it is elsewhere. `--force-new-cluster` rebuilds the one-manager
    cluster from its own raft state, so services, secrets, networks and node labels are kept; the running tasks are
    not restarted. Idempotent: a second `up` finds the address in place and does nothing.
    ``seed_marker``: a file put in the model directory on the data volume: the replicas that see it (this node's)
    seed the shared registry, importing this node's models (app/service.py)."""
    marker = (
        # The model's directory is the replicas': never written by root, and a link there is refused.
        refuse_link(seed_marker) + "\n" + as_owner(MODEL_UID, f"touch {shlex.quote(seed_marker)}") + "\n"
        if seed_marker
        else ""
    )
    addresses = f"--advertise-addr {target.advertise} --listen-addr {target.listen}" + (
        f" --data-path-addr {target.data_path}" if target.data_path else ""
    )
    wait = "" if target.advertise == SWARM_ADVERTISE_ADDR else _wait_for_address(target.advertise, "swarm address")
    return (
        "set -eu\n"
        + wait
        + 'if [ "$(docker info --format "{{.Swarm.LocalNodeState}}")" != active ]; then\n'
        + f"  docker swarm init {addresses} >/dev/null\n"
        + "fi\n"
        + 'current=$(docker info --format "{{.Swarm.NodeAddr}}")\n'
        + f'if [ "$current" != {target.advertise} ]; then\n'
        + f"  docker swarm init --force-new-cluster {addresses} >/dev/null\n"
        + f'  echo "swarm moved from $current to {target.advertise}"\n'
        + "fi\n"
        + "docker node update --label-add "
        + f"{NODE_LABEL}={MANAGER_NODE} \"$(docker info --format '{{{{.Swarm.NodeID}}}}')\" >/dev/null\n"
        + marker
        + f"echo swarm on {target.advertise}\n"
    )


JOIN_TOKEN_COMMAND = "docker swarm join-token --quiet worker"  # noqa: S105 (prints the token; a secret output)


JOINED_TOKEN_FILE = "/var/lib/mlapi/swarm-join-token.sha256"  # noqa: S105 (a digest, not the token)


def render_worker_join(worker_ip: str, manager_ip: str = MANAGER_PRIVATE_IP) -> str:
    """On a worker: join the manager's swarm over the private network with the token read from stdin (never on a
    command line or in a resource's inputs in plaintext). Prints the node ID, which the manager's steps use.

    A second `up` with the same token finds the node joined and does nothing. Another token means another swarm (the
    manager was replaced: same private address, new cluster) or a rotated one: leave and join again."""
    join_request = (
        f'{{"ListenAddr":"{worker_ip}:{SWARM_PORT}","AdvertiseAddr":"{worker_ip}","DataPathAddr":"{worker_ip}",'
        f'"RemoteAddrs":["{manager_ip}:{SWARM_PORT}"],"JoinToken":"%s"}}'
    )
    return (
        "set -eu\n"
        + _wait_for_address(worker_ip, "worker address")
        + "token=$(cat)\n"
        # A swarm token is SWMTKN-1- and [a-z0-9-]: anything else is refused before it reaches JSON or a shell.
        + 'case $token in SWMTKN-1-*) ;; *) echo "stdin holds no swarm join token" >&2; exit 1 ;; esac\n'
        + 'case $token in *[!A-Za-z0-9-]*) echo "the swarm join token has unexpected characters" >&2; exit 1 ;; esac\n'
        + 'digest=$(printf %s "$token" | sha256sum | cut -d" " -f1)\n'
        + 'if [ "$(docker info --format "{{.Swarm.LocalNodeState}}")" = active ] '
        + f'&& [ "$(cat {JOINED_TOKEN_FILE} 2>/dev/null)" != "$digest" ]; then\n'
        + "  docker swarm leave --force >/dev/null\n"
        + "fi\n"
        + 'if [ "$(docker info --format "{{.Swarm.LocalNodeState}}")" != active ]; then\n'
        # The engine's API with the request on stdin: `docker swarm join --token` would show the token to anyone
        # who lists processes while it runs (printf is the shell's own, no process).
        + f"  printf '{join_request}' \"$token\" | curl --silent --show-error --fail-with-body "
        + "--unix-socket /var/run/docker.sock -H 'Content-Type: application/json' --data-binary @- "
        + "http://localhost/swarm/join >&2\n"
        + f'  mkdir -p {JOINED_TOKEN_FILE.rsplit("/", 1)[0]} && echo "$digest" > {JOINED_TOKEN_FILE}\n'
        + "fi\n"
        + 'docker info --format "{{.Swarm.NodeID}}"\n'
    )


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
    node = shlex.quote(node_id)
    return (
        "set -eu\n"
        f"i=0; while [ \"$(docker node inspect --format '{{{{.Status.State}}}}' {node} 2>/dev/null)\" != ready ] "
        f"&& [ $i -lt {timeout_s} ]; do sleep 1; i=$((i+1)); done\n"
        f"[ \"$(docker node inspect --format '{{{{.Status.State}}}}' {node})\" = ready ] || "
        f"{{ echo 'node {node_id} did not become ready in {timeout_s} s' >&2; exit 1; }}\n"
        f"docker node update --availability active --label-add {NODE_LABEL}={shlex.quote(label)} {node} >/dev/null\n"
        f"echo node {node_id} ready as {label}\n"
    )


def render_node_drain(node_id: str, timeout_s: int = DRAIN_TIMEOUT_S) -> str:
    """On the manager, before a worker goes (`workers` lowered, or the worker replaced): drain it, so swarm starts
    its replicas elsewhere first (start-first) and stops these with their grace period, wait until none is left,
    then remove the node. A node that is already gone is fine."""
    refused = refused_node_id(node_id)
    if refused:
        return refused
    node = shlex.quote(node_id)
    return (
        "set -u\n"
        f"docker node inspect {node} >/dev/null 2>&1 || {{ echo 'node {node_id} is already gone'; exit 0; }}\n"
        f"docker node update --availability drain {node} >/dev/null\n"
        # Until no task of the node still runs: a stopping replica finishes its requests (its grace period).
        f"i=0; while docker node ps --format '{{{{.CurrentState}}}}' {node} | grep -qE '^(Running|Starting|Preparing)' "
        f"&& [ $i -lt {timeout_s} ]; do sleep 1; i=$((i+1)); done\n"
        # The node's tasks are gone; wait for the service to be whole again elsewhere before the node goes.
        f"i=0; while docker service ls --filter name={MODEL_SERVICE} --format '{{{{.Replicas}}}}' "
        "| awk -F/ '$1+0 != $2+0 {f=1} END {exit !f}' && [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done\n"
        f"docker node rm --force {node} >/dev/null\n"
        f"echo node {node_id} drained and removed\n"
    )


# On the worker, after the manager removed it: leave (the server is usually deleted right after).
WORKER_LEAVE = "docker swarm leave --force >/dev/null 2>&1 || true\necho left the swarm\n"
