"""Two VM stand-ins as a swarm: the manager and one worker, each with its own Docker engine, on a Docker network
standing in for the Hetzner private network, set up by the same rendered steps the Pulumi program runs
(infra/host/cluster_plan.py). Used by tests/standin/test_cluster.py and benchmarks/bench_cluster.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker

from infra.host.cloud_init import READINESS_COMMAND, hcloud_volume_device, render_user_data
from infra.host.cluster_plan import (
    JOIN_TOKEN_COMMAND,
    SwarmAddress,
    render_node_ready,
    render_swarm_address,
    render_worker_join,
    seed_marker_path,
)
from infra.host.setup import render_host_setup
from infra.local import images
from infra.local.engine import deploy_stack
from infra.local.postgres import build_postgres
from infra.ops.smoke import wait_healthy
from infra.spec.postgres import database_url
from infra.spec.stack import DATABASE_URL_SECRET, MODEL_SERVICE, POSTGRES_PASSWORD_SECRET, build_stack
from infra.spec.types import StackSpec
from testbed.stack import TIMINGS, docker_engine, wait_until
from testbed.standin import (
    CA_ON_HOST,
    StandIn,
    boot_standin,
    build_standin_image,
    https,
    load_images,
    network_with_pebble,
    new_key,
    remove_volume,
    ssh_on_path,
    standin_inputs,
    standin_tokens,
)

DOMAIN = "cluster.mlapi.test"
MANAGER, WORKER = "mlapi-cluster-manager", "mlapi-cluster-worker-1"
PEBBLE = "mlapi-cluster-pebble"

DATA_ROOT = "/srv/mlapi"


@dataclass
class Node:
    standin: StandIn
    name: str
    docker_volume: str
    data_volume: str

    @property
    def ip(self) -> str:
        return self.standin.ip


@dataclass
class Cluster:
    client: docker.DockerClient
    spec: StackSpec
    manager: Node
    worker: Node
    ssh_options: list[str]
    pebble_root: Path
    tokens: dict[str, str]
    network: str = ""
    worker_node_id: str = ""

    def ssh(self, node: Node, command: str, stdin: str | None = None, timeout: float = 600) -> str:
        result = subprocess.run(
            ["ssh", *self.ssh_options, f"root@{node.ip}", command],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"on {node.name}: {command[:80]!r} exited {result.returncode}: "
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        return result.stdout

    def remote(self, node: Node) -> docker.DockerClient:
        return docker.DockerClient(base_url=f"ssh://root@{node.ip}", use_ssh_client=True, timeout=600)

    def https(self, method: str, path: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
        """Through Traefik on the manager; the JSON answer."""
        payload = json.dumps(body).encode() if body is not None else b""
        request = f"{method} {path} HTTP/1.1\r\n"
        request += "Content-Type: application/json\r\n" if body is not None else ""
        request += f"Authorization: Bearer {token}\r\n" if token else ""
        status, _, answer, _ = https(self.manager.ip, DOMAIN, self.pebble_root, request, payload)
        return status, json.loads(answer or b"{}")

    def replicas_by_node(self) -> dict[str, set[str]]:
        """Which node runs which model container: {node name: {container hostnames (12-character IDs)}}."""
        found: dict[str, set[str]] = {}
        for node in (self.manager, self.worker):
            output = self.ssh(node, f"docker ps -q --filter label=com.docker.swarm.service.name={MODEL_SERVICE}")
            found[node.name] = {line[:12] for line in output.split()}
        return found

    def served(self, samples: int = 40) -> dict[str, str]:
        """{replica hostname: model version} from answers through Traefik on the manager."""
        seen: dict[str, str] = {}
        for _ in range(samples):
            status, body = self.https("GET", "/model")
            if status == 200:
                seen[body["served_by"]] = body["version"]
        return seen


def boot(client, image: str, name: str, network: str, user_data: str, aliases: list[str]) -> Node:
    data_volume, docker_volume = (f"{name}-{kind}-{uuid.uuid4().hex[:6]}" for kind in ("data", "docker"))
    client.volumes.create(data_volume)
    client.volumes.create(docker_volume)
    standin = boot_standin(
        client,
        image,
        name=name,
        network=network,
        aliases=aliases,
        user_data=user_data,
        data_volume=data_volume,
        docker_volume=docker_volume,
    )
    return Node(standin, name, docker_volume, data_volume)


@contextlib.contextmanager
def two_node_cluster(tmp: Path) -> Iterator[Cluster]:
    """Boot, join and deploy; yield; remove every container, volume and network it made."""
    client = docker_engine()
    started = time.monotonic()
    built = {
        **images.build_stack_images(client),
        "postgres": build_postgres(client),
        "standin": build_standin_image(client),
    }
    key = tmp / "id_ed25519"
    new_key(key)
    # Each server's own host key, made before it exists, as the program does.
    host_keys = {name: new_key(tmp / f"host-{name}") for name in (MANAGER, WORKER)}
    known_hosts = tmp / "known_hosts"
    ssh_options = [
        "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes", "-i", str(key),
        "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=15",
    ]  # fmt: skip
    nodes: list[Node] = []
    with contextlib.ExitStack() as teardown:
        teardown.enter_context(ssh_on_path(tmp / "bin", ssh_options))
        # Stands in for the Hetzner private network.
        network = teardown.enter_context(network_with_pebble(client, tmp, "mlapi-cluster", built["pebble"], PEBBLE))
        teardown.callback(_remove_nodes, client, nodes)
        inputs = standin_inputs(DOMAIN, network, built, postgres_image=built["postgres"], model_replicas=2, nodes=2)
        spec = build_stack(inputs)
        # A fixed holdout split, as every stack test pins one: the promotion below must not depend on the draw.
        spec = dataclasses.replace(spec, model=dataclasses.replace(
            spec.model, env={**spec.model.env, "MLAPI_HOLDOUT_SEED": "42"}
        ))  # fmt: skip
        public_key = Path(f"{key}.pub").read_text().strip()
        user_data = {
            name: render_user_data(
                spec,
                ssh_public_key=public_key,
                data_root=DATA_ROOT,
                volume_device=hcloud_volume_device(4242) if name == MANAGER else None,
                docker_source="debian",
                host_key=host_keys[name],
            )
            for name in (MANAGER, WORKER)
        }
        booting = time.monotonic()
        for name, aliases in ((MANAGER, [DOMAIN]), (WORKER, [])):
            node = boot(client, built["standin"], name, network.name, user_data[name], aliases)
            nodes.append(node)
        known_hosts.write_text("".join(f"{n.ip} {host_keys[n.name].public_openssh}\n" for n in nodes))
        manager, worker = nodes
        password = uuid.uuid4().hex
        tokens = {
            **standin_tokens(spec),
            POSTGRES_PASSWORD_SECRET: password,
            DATABASE_URL_SECRET: database_url(password),
        }
        env = Cluster(client, spec, manager, worker, ssh_options, network.pebble_root, tokens, network.name)
        for node in nodes:
            wait_until(lambda n=node: _ssh_ok(env, n), 180, f"sshd on {node.name}")
            _retry_refused(lambda n=node: env.ssh(n, READINESS_COMMAND))
        boot_s = time.monotonic() - booting

        deploying = time.monotonic()
        # The program's order: the manager's swarm onto the private address, the deploy step, the worker's join.
        private = SwarmAddress(manager.ip, f"{manager.ip}:2377", manager.ip)
        env.ssh(manager, render_swarm_address(private, seed_marker=seed_marker_path(DATA_ROOT)))
        env.ssh(manager, render_host_setup(spec))
        env.ssh(manager, f"mkdir -p {Path(CA_ON_HOST).parent} && cat > {CA_ON_HOST}",
                stdin=(network.pebble_dir / "ca.pem").read_text())  # fmt: skip
        token = env.ssh(manager, JOIN_TOKEN_COMMAND).strip()
        env.worker_node_id = env.ssh(worker, render_worker_join(worker.ip, manager.ip), stdin=token).strip()
        env.ssh(manager, render_node_ready(env.worker_node_id, WORKER))
        # Images: from a registry in production; here saved and loaded over ssh://, the model's and the monitoring
        # one (the node exporter runs on every node) onto both nodes.
        on_manager = ("traefik", "docker_api", "model", "postgres", "monitoring")
        for node, roles in ((manager, on_manager), (worker, ("model", "monitoring"))):
            remote = env.remote(node)
            try:
                load_images(client, remote, {built[role] for role in roles})
            finally:
                remote.close()
        remote = env.remote(manager)
        try:
            deploy_stack(remote, spec, tokens)
        finally:
            remote.close()
        ok, message = wait_healthy(
            f"https://{DOMAIN}/health", attempts=240, delay=0.5, cacert=str(network.pebble_root), connect_to=manager.ip
        )
        assert ok, message
        TIMINGS.append(
            f"two-node cluster: images + boot of two stand-ins {boot_s + booting - started:.1f} s, swarm move + join "
            f"+ deploy to first verified HTTPS 200 {time.monotonic() - deploying:.1f} s"
        )
        yield env


def _remove_nodes(client: docker.DockerClient, nodes: list[Node]) -> None:
    for node in nodes:
        with contextlib.suppress(docker.errors.NotFound):
            node.standin.container.remove(force=True)
        remove_volume(client, node.docker_volume)
        remove_volume(client, node.data_volume)


def _ssh_ok(env: Cluster, node: Node) -> bool:
    try:
        env.ssh(node, "true", timeout=20)
        return True
    except (AssertionError, subprocess.TimeoutExpired):
        return False


def _retry_refused(step, attempts: int = 30) -> None:
    """cloud-init may restart sshd while the readiness step runs: like the command provider, dial again."""
    for attempt in range(attempts):
        try:
            step()
            return
        except AssertionError as exc:
            if "exited 255" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(2)
