"""Pulumi components: they only map the spec (infra/spec.py) and the config (infra/config.py) to resources."""

from __future__ import annotations

import os
from pathlib import Path

import pulumi
import pulumi_cloudflare as cloudflare
import pulumi_command as command
import pulumi_docker as docker
import pulumi_hcloud as hcloud

from infra.cloud_init import READINESS_COMMAND, hcloud_volume_device, render_user_data
from infra.config import ConfigError, DeployConfig
from infra.deploy import KNOWN_HOSTS_SCRIPT, docker_ssh_options, firewall_rules, smoke_command
from infra.spec import ContainerSpec, StackSpec


def _private_key(cfg: DeployConfig) -> pulumi.Output[str] | None:
    if not cfg.ssh_private_key_path:
        return None  # the remote command falls back to SSH_AUTH_SOCK, like the Docker provider's ssh
    path = Path(cfg.ssh_private_key_path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"configuration 'sshPrivateKeyPath': {path} is not a readable file. "
            "Set it with: pulumi config set sshPrivateKeyPath ~/.ssh/id_ed25519"
        )
    return pulumi.Output.secret(path.read_text())


class Host(pulumi.ComponentResource):
    """The VM: SSH key, cloud firewall, data volume, server with our user-data, DNS, and the wait for cloud-init."""

    def __init__(
        self, name: str, cfg: DeployConfig, spec: StackSpec, data_root: str, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("mlapi:infra:Host", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        labels = {"app": "mlapi", "stack": pulumi.get_stack()}

        self.ssh_key = hcloud.SshKey(
            f"{name}-ssh-key", name=f"{name}-deploy", public_key=cfg.ssh_public_key, labels=labels, opts=child
        )
        self.firewall = hcloud.Firewall(
            f"{name}-firewall",
            name=name,
            labels=labels,
            rules=[
                hcloud.FirewallRuleArgs(
                    direction=rule.direction,
                    protocol=rule.protocol,
                    port=rule.port,
                    source_ips=list(rule.source_ips),
                    description=rule.description,
                )
                for rule in firewall_rules(cfg.ssh_allowed_cidrs)
            ],
            opts=child,
        )
        if cfg.data_volume_id is not None:
            self.volume = None
            volume_id: pulumi.Output[int] = pulumi.Output.from_input(cfg.data_volume_id)
        else:
            # Models, prediction log and acme.json outlive the server; `pulumi destroy` keeps the volume unless
            # keepDataVolume=false (re-attach a kept one with dataVolumeId).
            self.volume = hcloud.Volume(
                f"{name}-data",
                name=f"{name}-data",
                size=cfg.volume_size,
                location=cfg.location,
                format="ext4",
                labels=labels,
                opts=pulumi.ResourceOptions(parent=self, retain_on_delete=cfg.keep_data_volume),
            )
            volume_id = self.volume.id.apply(int)

        user_data = volume_id.apply(
            lambda vid: render_user_data(
                spec, ssh_public_key=cfg.ssh_public_key, data_root=data_root, volume_device=hcloud_volume_device(vid)
            )
        )
        self.server = hcloud.Server(
            f"{name}-server",
            name=name,
            server_type=cfg.server_type,
            image=cfg.image,
            location=cfg.location,
            ssh_keys=[self.ssh_key.id],
            user_data=user_data,
            firewall_ids=[self.firewall.id.apply(int)],
            public_nets=[hcloud.ServerPublicNetArgs(ipv4_enabled=True, ipv6_enabled=True)],
            labels=labels,
            # The name is unique and the volume attaches to one server: the old one must go first.
            opts=pulumi.ResourceOptions(parent=self, delete_before_replace=True),
        )
        self.attachment = hcloud.VolumeAttachment(
            f"{name}-data-attachment",
            server_id=self.server.id.apply(int),
            volume_id=volume_id,
            automount=False,
            opts=child,
        )
        self.ipv4: pulumi.Output[str] = self.server.ipv4_address
        self.ipv6: pulumi.Output[str] = self.server.ipv6_address

        # Not proxied by default: the ACME challenge needs a direct connection to Traefik.
        self.dns_a, self.dns_aaaa = (
            cloudflare.DnsRecord(
                f"{name}-dns-{record_type.lower()}",
                zone_id=cfg.cloudflare_zone_id,
                name=spec.domain,
                type=record_type,
                content=address,
                ttl=1 if cfg.dns_proxied else 300,  # 1 = "automatic", which Cloudflare requires when proxied
                proxied=cfg.dns_proxied,
                comment="mlapi (pulumi)",
                opts=child,
            )
            for record_type, address in (("A", self.ipv4), ("AAAA", self.ipv6))
        )

        self.ready = command.remote.Command(
            f"{name}-cloud-init-ready",
            connection=command.remote.ConnectionArgs(
                host=self.ipv4,
                user="root",
                private_key=_private_key(cfg),
                dial_error_limit=60,
                per_dial_timeout=10,
            ),
            create=READINESS_COMMAND,
            triggers=[self.server.id],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.attachment]),
        )
        self.host_key: pulumi.Output[str] = self.ready.stdout.apply(lambda out: out.strip())
        self.register_outputs({"ipv4": self.ipv4, "ipv6": self.ipv6, "serverId": self.server.id})


def container(
    resource_name: str,
    spec: ContainerSpec,
    image: pulumi.Input[str],
    network: docker.Network,
    opts: pulumi.ResourceOptions,
) -> docker.Container:
    """One spec container as a docker.Container: every field comes from the spec, nothing is added here."""
    check = spec.healthcheck
    return docker.Container(
        resource_name,
        name=spec.name,
        image=image,
        command=list(spec.command),
        envs=[f"{key}={value}" for key, value in spec.env.items()],
        labels=[docker.ContainerLabelArgs(label=key, value=value) for key, value in spec.labels.items()],
        mounts=[
            docker.ContainerMountArgs(type="bind", source=m.source, target=m.target, read_only=m.read_only)
            for m in spec.mounts
        ],
        ports=[
            docker.ContainerPortArgs(internal=p.container_port, external=p.host_port, ip=p.host_ip, protocol="tcp")
            for p in spec.ports
        ],
        networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=network.name, aliases=list(spec.aliases))],
        healthcheck=docker.ContainerHealthcheckArgs(
            tests=list(check.test),
            interval=f"{check.interval_s}s",
            timeout=f"{check.timeout_s}s",
            retries=check.retries,
            start_period=f"{check.start_period_s}s",
        ),
        restart=spec.restart,
        opts=opts,
    )


class ModelStack(pulumi.ComponentResource):
    """Traefik and the model container on the VM's Docker engine, reached over ssh:// with a pinned host key."""

    def __init__(
        self,
        name: str,
        cfg: DeployConfig,
        spec: StackSpec,
        host: Host,
        app_dir: Path,
        known_hosts: Path,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("mlapi:infra:ModelStack", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.known_hosts = command.local.Command(
            f"{name}-known-hosts",
            create=KNOWN_HOSTS_SCRIPT,
            delete='rm -f "$KNOWN_HOSTS"',
            environment={"KNOWN_HOSTS": str(known_hosts), "HOST_IP": host.ipv4, "HOST_KEY": host.host_key},
            triggers=[host.host_key],
            opts=child,
        )
        # Derived from the pinning step's output, which needs the readiness step's output: the provider cannot
        # connect before cloud-init is done, even where providers ignore depends_on.
        docker_host = pulumi.Output.all(host.ipv4, self.known_hosts.stdout).apply(lambda v: f"ssh://root@{v[0]}")
        self.provider = docker.Provider(
            f"{name}-docker",
            host=docker_host,
            ssh_opts=docker_ssh_options(known_hosts, cfg.ssh_private_key_path),
            opts=child,
        )
        on_host = pulumi.ResourceOptions(parent=self, provider=self.provider)

        self.network = docker.Network(f"{name}-network", name=spec.network, opts=on_host)
        self.traefik_image = docker.RemoteImage(
            f"{name}-traefik-image", name=spec.traefik.image, keep_locally=True, opts=on_host
        )
        if cfg.model_image:
            self.model_image = docker.RemoteImage(
                f"{name}-model-image", name=spec.model.image, keep_locally=True, opts=on_host
            )
            model_image_ref = self.model_image.image_id
        else:
            self.model_image = docker.Image(
                f"{name}-model-image",
                image_name=spec.model.image,
                # Relative to the project directory (Pulumi's working directory), so that previews made on
                # different machines (an operator's laptop, CI) do not differ by an absolute path.
                build=docker.DockerBuildArgs(
                    context=os.path.relpath(app_dir), dockerfile=os.path.relpath(app_dir / "Dockerfile")
                ),
                skip_push=True,
                opts=on_host,
            )
            model_image_ref = self.model_image.image_name
        self.traefik = container(f"{name}-traefik", spec.traefik, self.traefik_image.image_id, self.network, on_host)
        self.model = container(
            f"{name}-model",
            spec.model,
            model_image_ref,
            self.network,
            pulumi.ResourceOptions(parent=self, provider=self.provider, depends_on=[self.traefik]),
        )
        self.smoke = command.local.Command(
            f"{name}-smoke-check",
            create=smoke_command(spec.domain, staging=cfg.acme_staging),
            triggers=[host.server.id, self.traefik.id, self.model.id],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.traefik, self.model, host.dns_a, host.dns_aaaa]),
        )
        self.register_outputs({})
