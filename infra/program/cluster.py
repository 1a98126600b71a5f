"""Growing past one VM, as Pulumi components: the private network, an optional Hetzner Load Balancer in front, and the
cluster (the manager on the private network, worker VMs that join its swarm, and drain before they go).

The shell steps are pure functions in infra/host/cluster_plan.py; here they are only wired to servers and connections.
"""

from __future__ import annotations

import pulumi
import pulumi_command as command
import pulumi_hcloud as hcloud
import pulumi_tls as tls

from infra.config.keys import DeployConfig
from infra.host.cloud_init import READINESS_COMMAND, HostKey, render_user_data
from infra.host.cluster_plan import (
    JOIN_TOKEN_COMMAND,
    LOAD_BALANCER_PRIVATE_IP,
    LOOPBACK,
    MANAGER_PRIVATE_IP,
    PRIVATE,
    PRIVATE_NETWORK,
    PRIVATE_SUBNET,
    WORKER_LEAVE,
    network_zone,
    render_node_drain,
    render_node_ready,
    render_swarm_address,
    render_worker_join,
    seed_marker_path,
    worker_firewall_rules,
    worker_name,
    worker_private_ip,
)
from infra.program.host import Host, firewall_args, ssh_connection
from infra.spec.types import StackSpec


def _labels(role: str) -> dict[str, str]:
    return {"app": "mlapi", "stack": pulumi.get_stack(), "role": role}


class PrivateNetwork(pulumi.ComponentResource):
    """A Hetzner Cloud Network with one cloud subnet in the location's network zone (free of charge)."""

    def __init__(self, name: str, cfg: DeployConfig, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("mlapi:infra:PrivateNetwork", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.network = hcloud.Network(
            f"{name}-network", name=name, ip_range=PRIVATE_NETWORK, labels=_labels("network"), opts=child
        )
        self.network_id: pulumi.Output[int] = self.network.id.apply(int)
        self.subnet = hcloud.NetworkSubnet(
            f"{name}-subnet",
            network_id=self.network_id,
            type="cloud",
            network_zone=network_zone(cfg.location),
            ip_range=PRIVATE_SUBNET,
            opts=child,
        )
        self.register_outputs({"networkId": self.network_id})


class LoadBalancerFront(pulumi.ComponentResource):
    """A Hetzner Load Balancer passing TCP 80/443 through to Traefik on the manager's private address, with the
    PROXY protocol so Traefik sees (and rate-limits) the clients' addresses. DNS points here instead of the server."""

    def __init__(
        self, name: str, cfg: DeployConfig, network: PrivateNetwork, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("mlapi:infra:LoadBalancerFront", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.load_balancer = hcloud.LoadBalancer(
            f"{name}-lb",
            name=name,
            load_balancer_type=cfg.load_balancer_type,
            location=cfg.location,
            labels=_labels("load-balancer"),
            opts=child,
        )
        self.load_balancer_id: pulumi.Output[int] = self.load_balancer.id.apply(int)
        self.attachment = hcloud.LoadBalancerNetwork(
            f"{name}-lb-network",
            load_balancer_id=self.load_balancer_id,
            network_id=network.network_id,
            ip=LOAD_BALANCER_PRIVATE_IP,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[network.subnet]),
        )
        self.services = [
            hcloud.LoadBalancerService(
                f"{name}-lb-{port}",
                load_balancer_id=self.load_balancer_id,
                protocol="tcp",
                listen_port=port,
                destination_port=port,
                proxyprotocol=True,
                health_check=hcloud.LoadBalancerServiceHealthCheckArgs(
                    protocol="tcp", port=port, interval=10, timeout=5, retries=3
                ),
                opts=child,
            )
            for port in (80, 443)
        ]
        self.ipv4: pulumi.Output[str] = self.load_balancer.ipv4
        self.ipv6: pulumi.Output[str] = self.load_balancer.ipv6
        self.register_outputs({"ipv4": self.ipv4})


class Cluster(pulumi.ComponentResource):
    """The manager on the private network (its swarm moved there), and ``cfg.workers`` worker VMs joined to it.

    Lowering ``workers`` deletes the highest-numbered workers; before each goes, the manager drains it (its replicas
    start elsewhere first) and removes the node. Going back to 0 moves the swarm back to loopback."""

    def __init__(
        self,
        name: str,
        cfg: DeployConfig,
        spec: StackSpec,
        host: Host,
        network: PrivateNetwork,
        front: LoadBalancerFront | None,
        data_root: str,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("mlapi:infra:Cluster", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.manager_attachment = hcloud.ServerNetwork(
            f"{name}-manager-network",
            server_id=host.server.id.apply(int),
            network_id=network.network_id,
            ip=MANAGER_PRIVATE_IP,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[network.subnet]),
        )
        if front is not None:
            self.load_balancer_target = hcloud.LoadBalancerTarget(
                f"{name}-lb-target",
                type="server",
                load_balancer_id=front.load_balancer_id,
                server_id=host.server.id.apply(int),
                use_private_ip=True,
                opts=pulumi.ResourceOptions(parent=self, depends_on=[front.attachment, self.manager_attachment]),
            )
        self.ready: list[pulumi.Resource] = [self.manager_attachment]
        if cfg.workers == 0:
            self.register_outputs({})
            return  # only the load balancer needed the network

        self.swarm_address = command.remote.Command(
            f"{name}-swarm-address",
            connection=host.connection,
            create=render_swarm_address(PRIVATE, seed_marker=seed_marker_path(data_root)),
            delete=render_swarm_address(LOOPBACK),  # the last worker is gone: back to loopback
            triggers=[host.server.id],
            # A manager that is itself going away needs no move (and cannot be reached).
            opts=pulumi.ResourceOptions(
                parent=self, depends_on=[host.ready, self.manager_attachment], deleted_with=host.server
            ),
        )
        self.join_token = command.remote.Command(
            f"{name}-join-token",
            connection=host.connection,
            create=JOIN_TOKEN_COMMAND,
            triggers=[host.server.id],
            opts=pulumi.ResourceOptions(
                parent=self, depends_on=[self.swarm_address], additional_secret_outputs=["stdout"]
            ),
        )
        token: pulumi.Output[str] = pulumi.Output.secret(self.join_token.stdout)
        self.firewall = hcloud.Firewall(
            f"{name}-worker-firewall",
            name=f"{name}-workers",
            labels=_labels("worker"),
            rules=firewall_args(worker_firewall_rules(cfg.ssh_allowed_cidrs)),
            opts=child,
        )
        self.workers = [
            Worker(f"{name}-worker-{index + 1}", index, cfg, spec, host, network, self, token, data_root)
            for index in range(cfg.workers)
        ]
        self.ready = [self.swarm_address, *(worker.node for worker in self.workers)]
        self.register_outputs({"workers": [worker.server.ipv4_address for worker in self.workers]})


class Worker(pulumi.ComponentResource):
    """One worker VM: the manager's base cloud-init (Docker, SSH hardening; no data volume), its own pinned host key,
    the private network only for swarm; joined by the token, labelled for the spread, drained before it goes."""

    def __init__(
        self,
        name: str,
        index: int,
        cfg: DeployConfig,
        spec: StackSpec,
        host: Host,
        network: PrivateNetwork,
        cluster: Cluster,
        token: pulumi.Output[str],
        data_root: str,
    ) -> None:
        super().__init__("mlapi:infra:Worker", name, None, pulumi.ResourceOptions(parent=cluster))
        child = pulumi.ResourceOptions(parent=self)
        hostname = worker_name(f"mlapi-{pulumi.get_stack()}", index)
        address = worker_private_ip(index)
        self.host_key = tls.PrivateKey(f"{name}-host-key", algorithm="ED25519", opts=child)
        user_data = pulumi.Output.all(self.host_key.private_key_openssh, self.host_key.public_key_openssh).apply(
            lambda keys: render_user_data(
                spec,
                ssh_public_key=cfg.ssh_public_key,
                data_root=data_root,
                volume_device=None,  # the data volume stays with the manager
                host_key=HostKey(keys[0], keys[1].strip()),
            )
        )
        self.server = hcloud.Server(
            f"{name}-server",
            name=hostname,
            server_type=cfg.worker_server_type or cfg.server_type,
            image=cfg.image,
            location=cfg.location,
            ssh_keys=[host.ssh_key_id],
            user_data=pulumi.Output.secret(user_data),
            firewall_ids=[cluster.firewall.id.apply(int)],
            public_nets=[hcloud.ServerPublicNetArgs(ipv4_enabled=True, ipv6_enabled=True)],
            networks=[hcloud.ServerNetworkArgs(network_id=network.network_id, ip=address)],
            labels=_labels("worker"),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[network.subnet], delete_before_replace=True),
        )
        self.connection = ssh_connection(
            self.server.ipv4_address, host.connection.private_key, self.host_key.public_key_openssh.apply(str.strip)
        )
        self.ready = command.remote.Command(
            f"{name}-cloud-init-ready",
            connection=self.connection,
            create=READINESS_COMMAND,
            triggers=[self.server.id],
            opts=child,
        )
        # Joins with the token on stdin; its stdout is the node ID the manager's steps use.
        self.join = command.remote.Command(
            f"{name}-join",
            connection=self.connection,
            create=render_worker_join(address),
            stdin=token,
            delete=WORKER_LEAVE,
            # A new manager is a new swarm (and a new token): join again.
            triggers=[self.server.id, host.server.id],
            opts=pulumi.ResourceOptions(
                parent=self, depends_on=[self.ready, cluster.swarm_address], deleted_with=self.server
            ),
        )
        node_id = self.join.stdout.apply(lambda out: out.strip())
        self.node = command.remote.Command(
            f"{name}-node",
            connection=host.connection,
            create=node_id.apply(lambda node: render_node_ready(node, hostname)),
            delete=node_id.apply(render_node_drain),
            triggers=[self.server.id, host.server.id],
            # Drained through the manager; a manager that is going away takes its swarm with it.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.join], deleted_with=host.server),
        )
        self.register_outputs({"ipv4": self.server.ipv4_address})
