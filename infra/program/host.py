"""The VM as a Pulumi component: SSH key, generated host key, cloud firewall, data volume, server with our user-data,
DNS, and the wait for cloud-init; plus the read-only look-ups in the Hetzner project that make a second `up` safe
(an SSH key that already exists, a kept volume, a volume in another location)."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pulumi
import pulumi_cloudflare as cloudflare
import pulumi_command as command
import pulumi_hcloud as hcloud
import pulumi_tls as tls

from infra.config.keys import ConfigError, DeployConfig
from infra.host.cloud_init import READINESS_COMMAND, HostKey, hcloud_volume_device, render_user_data
from infra.host.deploy import FirewallRule, firewall_rules
from infra.program.dns_challenge import DNS01_COMMENT
from infra.spec.inputs import WORLD
from infra.spec.types import StackSpec


def _private_key(cfg: DeployConfig) -> pulumi.Output[str] | None:
    if not cfg.ssh_private_key_path:
        return None  # the remote command falls back to SSH_AUTH_SOCK, like the Docker provider's ssh
    return pulumi.Output.secret(Path(cfg.ssh_private_key_path).expanduser().read_text())  # checked by load_config


def ssh_connection(
    address: pulumi.Input[str], private_key: pulumi.Input[str] | None, host_key: pulumi.Input[str]
) -> command.remote.ConnectionArgs:
    """Root on a server whose host key the program made: pinned from the first dial, retried while it boots."""
    return command.remote.ConnectionArgs(
        host=address, user="root", private_key=private_key, host_key=host_key, dial_error_limit=60, per_dial_timeout=10
    )


def _look_up(what: str, invoke):
    """A read-only look-up in the Hetzner project; if it cannot be made, say so and carry on as if nothing was found
    (the create that follows then fails with the provider's own error, naming the conflict)."""
    try:
        return invoke()
    except Exception as exc:
        pulumi.log.warn(f"could not look up {what} in the Hetzner project ({exc}); assuming there is none")
        return None


def _existing_ssh_key_id(public_key: str) -> str | None:
    """A key with the same fingerprint already in the Hetzner project: reuse it (creating it again fails)."""
    fingerprint = md5_fingerprint(public_key)
    found = _look_up("existing SSH keys", hcloud.get_ssh_keys)
    for key in (found.ssh_keys if found else None) or []:
        if getattr(key, "fingerprint", None) == fingerprint:
            pulumi.log.info(f"reusing the SSH key {key.name!r} (id {key.id}) already in the Hetzner project")
            return str(key.id)
    return None


def md5_fingerprint(public_key: str) -> str:
    """OpenSSH's MD5 fingerprint (aa:bb:…), the form Hetzner shows and stores."""
    blob = base64.b64decode(public_key.split()[1])
    digest = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _kept_volume_id(stack_labels: dict[str, str], location: str) -> int | None:
    """A data volume of this stack that outlived `pulumi destroy` (kept by default): adopt it instead of failing on
    its name. Only when no server of the stack exists, i.e. not on an ordinary second `up`.

    A volume cannot move to another location: a `location` change would replace it with an empty one and leave the
    data on the old one, so it is refused here, before anything is created."""
    selector = ",".join(f"{key}={value}" for key, value in stack_labels.items())
    found_volumes = _look_up("kept data volumes", lambda: hcloud.get_volumes(with_selector=selector))
    found_servers = _look_up("servers of this stack", lambda: hcloud.get_servers(with_selector=selector))
    if found_volumes is None or found_servers is None:
        return None
    volumes, servers = found_volumes.volumes or [], found_servers.servers or []
    elsewhere = [v for v in volumes if getattr(v, "location", location) not in (None, "", location)]
    if elsewhere:
        raise ConfigError(
            f"configuration 'location': {location!r}, but this stack's data volume {elsewhere[0].name!r} "
            f"(id {elsewhere[0].id}) is in {elsewhere[0].location!r}, and volumes cannot move between locations. "
            f"Keep it with: pulumi config set location {elsewhere[0].location}"
        )
    if len(volumes) == 1 and not servers:
        volume_id = int(volumes[0].id)
        pulumi.log.info(f"adopting the kept data volume {volumes[0].name!r} (id {volume_id}) of this stack")
        return volume_id
    return None


def firewall_args(rules: tuple[FirewallRule, ...]) -> list[hcloud.FirewallRuleArgs]:
    return [
        hcloud.FirewallRuleArgs(
            direction=rule.direction,
            protocol=rule.protocol,
            port=rule.port,
            source_ips=list(rule.source_ips),
            description=rule.description,
        )
        for rule in rules
    ]


class Host(pulumi.ComponentResource):
    """The VM: SSH key, host key, cloud firewall, data volume, server with our user-data, DNS, the cloud-init wait."""

    def __init__(
        self,
        name: str,
        cfg: DeployConfig,
        spec: StackSpec,
        data_root: str,
        front: tuple[pulumi.Output[str], pulumi.Output[str]] | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        """``front``: the (IPv4, IPv6) clients reach instead of the server's (a load balancer); the server then takes
        web traffic only from it, over the private network."""
        super().__init__("mlapi:infra:Host", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        labels = {"app": "mlapi", "stack": pulumi.get_stack()}

        existing_key = _existing_ssh_key_id(cfg.ssh_public_key)
        if existing_key is None:
            self.ssh_key: hcloud.SshKey | None = hcloud.SshKey(
                f"{name}-ssh-key", name=f"{name}-deploy", public_key=cfg.ssh_public_key, labels=labels, opts=child
            )
            ssh_key_id: pulumi.Input[str] = self.ssh_key.id
        else:
            self.ssh_key, ssh_key_id = None, existing_key
        self.ssh_key_id = ssh_key_id  # the workers get the same key
        # The server's SSH host key: made here, installed by cloud-init, pinned by every connection from the first.
        self.host_key = tls.PrivateKey(f"{name}-host-key", algorithm="ED25519", opts=child)
        self.host_public_key: pulumi.Output[str] = self.host_key.public_key_openssh.apply(str.strip)
        # The policy pack (policy/rules.py) blocks SSH open to the world unless the operator typed it: this label
        # says so.
        world_by_choice = bool(set(WORLD) & set(cfg.ssh_allowed_cidrs))  # sshAllowedCidrs is required
        self.firewall = hcloud.Firewall(
            f"{name}-firewall",
            name=name,
            labels={**labels, "ssh-world-explicit": "true"} if world_by_choice else labels,
            rules=firewall_args(firewall_rules(cfg.ssh_allowed_cidrs, public_web=front is None)),
            opts=child,
        )
        if cfg.data_volume_id is not None:
            self.volume = None
            volume_id: pulumi.Output[int] = pulumi.Output.from_input(cfg.data_volume_id)
        else:
            # Models, prediction log and certificates outlive the server; `pulumi destroy` keeps the volume unless
            # keepDataVolume=false, and the next `up` of the stack adopts it.
            kept = _kept_volume_id(labels, cfg.location)
            self.volume = hcloud.Volume(
                f"{name}-data",
                name=f"{name}-data",
                size=cfg.volume_size,
                location=cfg.location,
                format="ext4",
                labels=labels,
                opts=pulumi.ResourceOptions(
                    parent=self, retain_on_delete=cfg.keep_data_volume, import_=str(kept) if kept else None
                ),
            )
            volume_id = self.volume.id.apply(int)

        user_data = pulumi.Output.all(
            volume_id, self.host_key.private_key_openssh, self.host_key.public_key_openssh
        ).apply(
            lambda values: render_user_data(
                spec,
                ssh_public_key=cfg.ssh_public_key,
                data_root=data_root,
                volume_device=hcloud_volume_device(values[0]),
                host_key=HostKey(values[1], values[2].strip()),
            )
        )
        self.server = hcloud.Server(
            f"{name}-server",
            name=name,
            server_type=cfg.server_type,
            image=cfg.image,
            location=cfg.location,
            ssh_keys=[ssh_key_id],
            user_data=pulumi.Output.secret(user_data),
            firewall_ids=[self.firewall.id.apply(int)],
            public_nets=[hcloud.ServerPublicNetArgs(ipv4_enabled=True, ipv6_enabled=True)],
            labels=labels,
            backups=cfg.server_backups,
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

        # Proxied only with DNS-01 certificates (config refuses it otherwise): TLS-ALPN needs a direct connection.
        self.front_ipv4, front_ipv6 = front or (self.ipv4, self.ipv6)
        self.dns_a, self.dns_aaaa = (
            cloudflare.DnsRecord(
                f"{name}-dns-{record_type.lower()}",
                zone_id=cfg.cloudflare_zone_id,
                name=spec.domain,
                type=record_type,
                content=address,
                ttl=300,
                proxied=cfg.dns_proxied,
                # The policy pack allows a proxied record only where the program says certificates use DNS-01.
                comment="mlapi (pulumi)" + (f"; {DNS01_COMMENT}" if cfg.acme_challenge == "dns" else ""),
                opts=child,
            )
            for record_type, address in (("A", self.front_ipv4), ("AAAA", front_ipv6))
        )

        self.connection = ssh_connection(self.ipv4, _private_key(cfg), self.host_public_key)
        self.ready = command.remote.Command(
            f"{name}-cloud-init-ready",
            connection=self.connection,
            create=READINESS_COMMAND,
            triggers=[self.server.id],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.attachment]),
        )
        self.register_outputs({"ipv4": self.ipv4, "ipv6": self.ipv6, "serverId": self.server.id})
