"""Pulumi components: they only map the spec (infra/spec.py) and the config (infra/config.py) to resources.

Lifecycle rules that make every later `pulumi up` safe (README: "Changing things later"):
- everything on the VM is bound to the server: `replace_with=[server]` recreates it on a new server, and
  `deleted_with=server` skips deleting it from a server that is going away anyway;
- the SSH host key is generated with the server (infra/host.py) and pinned by every connection, from the first one;
- settings that change are applied by the deploy step on every `up`, never through user-data.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pulumi
import pulumi_command as command
import pulumi_docker as docker
import pulumi_random as random

from infra.backup import INSTALL_CREDENTIALS, credentials_bundle, host_setup_parts
from infra.config import DeployConfig
from infra.deploy import docker_ssh_options, platform_for, smoke_command
from infra.host import Host
from infra.host_setup import render_graceful_stop, render_host_setup, render_platform_check
from infra.spec import (
    ADMIN_SECRET,
    INGEST_SECRET,
    ContainerSpec,
    MiB,
    ServiceSpec,
    StackSpec,
    go_duration,
    secret_name,
)

CONVERGE_TIMEOUT_S = 600


def _health(check) -> dict:
    return {
        "tests": list(check.test),
        "interval": go_duration(check.interval_s),
        "timeout": go_duration(check.timeout_s),
        "retries": check.retries,
        "start_period": go_duration(check.start_period_s),
    }


def container(
    resource_name: str,
    spec: ContainerSpec,
    image: pulumi.Input[str],
    network: docker.Network | None,
    opts: pulumi.ResourceOptions,
) -> docker.Container:
    """One spec container as a docker.Container: every field comes from the spec, nothing is added here.
    ``network``: the resource of the spec's network (None with a container that has none)."""
    return docker.Container(
        resource_name,
        name=spec.name,
        image=image,
        command=list(spec.command),
        envs=[f"{key}={value}" for key, value in spec.env.items()],
        labels=[docker.ContainerLabelArgs(label=key, value=value) for key, value in spec.labels.items()],
        mounts=[
            docker.ContainerMountArgs(type=m.kind, source=m.source, target=m.target, read_only=m.read_only)
            for m in spec.mounts
        ],
        ports=[
            docker.ContainerPortArgs(internal=p.container_port, external=p.host_port, ip=p.host_ip, protocol="tcp")
            for p in spec.ports
        ],
        networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=network.name, aliases=list(spec.aliases))]
        if network
        else [],
        network_mode=None if network else "none",
        healthcheck=docker.ContainerHealthcheckArgs(**_health(spec.healthcheck)) if spec.healthcheck else None,
        restart=spec.restart,
        user=spec.user,
        capabilities=docker.ContainerCapabilitiesArgs(
            drops=list(spec.confinement.cap_drop), adds=list(spec.confinement.cap_add)
        ),
        read_only=spec.confinement.read_only_root,
        tmpfs={spec.confinement.tmpfs_path: f"size={spec.confinement.tmpfs_bytes}"},
        memory=spec.confinement.memory_bytes // MiB,  # the provider counts megabytes
        security_opts=["no-new-privileges:true"] if spec.confinement.no_new_privileges else [],
        ulimits=[
            docker.ContainerUlimitArgs(name=name, soft=limit, hard=limit) for name, limit in spec.confinement.ulimits
        ],
        opts=opts,
    )


def swarm_token(
    name: str, base: str, parent: pulumi.Resource, on_host: pulumi.ResourceOptions
) -> tuple[random.RandomPassword, docker.Secret]:
    """A random bearer token and the swarm secret holding it (a new value gets a new secret name)."""
    token = random.RandomPassword(f"{name}-token", length=48, special=False, opts=pulumi.ResourceOptions(parent=parent))
    secret = docker.Secret(
        f"{name}-secret",
        name=token.result.apply(lambda value: secret_name(base, value)),
        data=token.result.apply(lambda value: base64.urlsafe_b64encode(value.encode()).decode()),
        opts=on_host,
    )
    return token, secret


def _rollout(policy) -> dict:
    return {
        "parallelism": policy.parallelism,
        "delay": go_duration(policy.delay_s),
        "failure_action": policy.failure_action,
        "monitor": go_duration(policy.monitor_s),
        "max_failure_ratio": f"{policy.max_failure_ratio:g}",
        "order": policy.order,
    }


def service(
    resource_name: str,
    spec: ServiceSpec,
    image: pulumi.Input[str],
    network: docker.Network,
    secrets: dict[str, docker.Secret],
    opts: pulumi.ResourceOptions,
) -> docker.Service:
    """The spec's swarm service as a docker.Service. With converge_config, `pulumi up` waits for the rolling update
    and fails ("service rollback completed: …") when swarm had to roll it back; the old version keeps serving."""
    restart = spec.restart
    return docker.Service(
        resource_name,
        name=spec.name,
        labels=[docker.ServiceLabelArgs(label=key, value=value) for key, value in spec.labels.items()],
        task_spec=docker.ServiceTaskSpecArgs(
            container_spec=docker.ServiceTaskSpecContainerSpecArgs(
                image=image,
                commands=list(spec.command),
                env=dict(spec.env),
                mounts=[
                    docker.ServiceTaskSpecContainerSpecMountArgs(
                        type=m.kind, source=m.source, target=m.target, read_only=m.read_only
                    )
                    for m in spec.mounts
                ]
                + [
                    docker.ServiceTaskSpecContainerSpecMountArgs(
                        type="tmpfs",
                        target=spec.confinement.tmpfs_path,
                        tmpfs_options=docker.ServiceTaskSpecContainerSpecMountTmpfsOptionsArgs(
                            size_bytes=spec.confinement.tmpfs_bytes
                        ),
                    )
                ],
                read_only=spec.confinement.read_only_root,
                cap_drops=list(spec.confinement.cap_drop),
                cap_adds=list(spec.confinement.cap_add) or None,
                healthcheck=docker.ServiceTaskSpecContainerSpecHealthcheckArgs(**_health(spec.healthcheck)),
                stop_grace_period=go_duration(spec.stop_grace_period_s),
                secrets=[
                    docker.ServiceTaskSpecContainerSpecSecretArgs(
                        secret_id=secrets[item.secret].id,
                        secret_name=secrets[item.secret].name,
                        file_name=item.file_name,  # under /run/secrets/
                        file_uid=str(item.uid),
                        file_gid=str(item.uid),
                        file_mode=item.mode,
                    )
                    for item in spec.secrets
                ],
                init=spec.init,
            ),
            resources=docker.ServiceTaskSpecResourcesArgs(
                limits=docker.ServiceTaskSpecResourcesLimitsArgs(memory_bytes=spec.confinement.memory_bytes)
            ),
            restart_policy=docker.ServiceTaskSpecRestartPolicyArgs(
                condition=restart.condition,
                delay=go_duration(restart.delay_s),
                max_attempts=restart.max_attempts,
                window=go_duration(restart.window_s),
            ),
            networks_advanceds=[docker.ServiceTaskSpecNetworksAdvancedArgs(id=network.id)],
        ),
        mode=docker.ServiceModeArgs(replicated=docker.ServiceModeReplicatedArgs(replicas=spec.replicas)),
        update_config=docker.ServiceUpdateConfigArgs(**_rollout(spec.update)),
        rollback_config=docker.ServiceRollbackConfigArgs(**_rollout(spec.rollback)),
        endpoint_spec=docker.ServiceEndpointSpecArgs(mode=spec.endpoint_mode),
        converge_config=docker.ServiceConvergeConfigArgs(delay=go_duration(5), timeout=go_duration(CONVERGE_TIMEOUT_S)),
        opts=opts,
    )


class ModelStack(pulumi.ComponentResource):
    """The deploy step, then Traefik and the model's swarm service on the VM's engine over ssh:// (pinned key)."""

    def __init__(
        self,
        name: str,
        cfg: DeployConfig,
        spec: StackSpec,
        host: Host,
        app_dir: Path,
        data_root: str,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("mlapi:infra:ModelStack", name, None, opts)
        after_boot = pulumi.ResourceOptions(parent=self, depends_on=[host.ready])
        backup_files, backup_commands = host_setup_parts(cfg.backup, data_root)
        # Runs at every `up` whose host files, layout or server changed; never replaces the server.
        self.host_setup = command.remote.Command(
            f"{name}-host-setup",
            connection=host.connection,
            create=render_host_setup(spec, backup_files, backup_commands),
            triggers=[host.server.id],
            opts=after_boot,
        )
        ready_for_docker: pulumi.Output[str] = self.host_setup.stdout
        if cfg.backup is not None:
            # The repository's credentials travel on stdin into root-only files (never in a command line or in
            # user-data); then an empty volume (a new stack after a loss) is restored before anything starts on it.
            bundle = credentials_bundle(
                cfg.backup,
                cfg.backup_password.get_secret_value(),
                {key: value.get_secret_value() for key, value in cfg.backup_environment.items()},
                cfg.backup_ssh_key.get_secret_value() if cfg.backup_ssh_key else None,
                cfg.backup_ssh_known_hosts,
            )
            self.backup_credentials = command.remote.Command(
                f"{name}-backup-credentials",
                connection=host.connection,
                create=INSTALL_CREDENTIALS,
                stdin=pulumi.Output.secret(bundle),
                triggers=[host.server.id],
                opts=pulumi.ResourceOptions(parent=self, depends_on=[self.host_setup]),
            )
            ready_for_docker = self.backup_credentials.stdout
        # Nothing to do on create; on delete (destroy, or the server being replaced) it stops the stack gracefully and
        # unmounts the volume before the volume is detached. Its inputs change only with the server.
        self.data_guard = command.remote.Command(
            f"{name}-data-guard",
            connection=host.connection,
            create="true",
            delete=render_graceful_stop(data_root),
            triggers=[host.server.id],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[host.ready, host.attachment]),
        )
        # Derived from the deploy step's output: the provider cannot connect before the host is set up, even where
        # providers ignore depends_on.
        docker_host = pulumi.Output.all(host.ipv4, ready_for_docker).apply(lambda v: f"ssh://root@{v[0]}")
        self.provider = docker.Provider(
            f"{name}-docker",
            host=docker_host,
            ssh_opts=host.host_public_key.apply(lambda key: docker_ssh_options(key, cfg.ssh_private_key_path)),
            opts=pulumi.ResourceOptions(parent=self),
        )
        on_host = pulumi.ResourceOptions(
            parent=self,
            provider=self.provider,
            replace_with=[host.server],
            deleted_with=host.server,
            depends_on=[self.data_guard],
        )
        platform = platform_for(cfg.server_type)

        self.network = docker.Network(
            f"{name}-network", name=spec.network, driver="overlay", attachable=True, opts=on_host
        )
        # The Docker API proxy's socket, shared with Traefik only (infra/docker_api.py).
        self.volumes = [docker.Volume(f"{name}-volume-{volume}", name=volume, opts=on_host) for volume in spec.volumes]
        self.traefik_image = docker.RemoteImage(
            f"{name}-traefik-image", name=spec.traefik.image, platform=platform, keep_locally=True, opts=on_host
        )
        self.docker_api_image = docker.RemoteImage(
            f"{name}-docker-api-image", name=spec.docker_api.image, platform=platform, keep_locally=True, opts=on_host
        )
        if cfg.model_image:
            # Pulled for the server's platform: an image without it fails here, naming the platform.
            self.model_image = docker.RemoteImage(
                f"{name}-model-image", name=spec.model.image, platform=platform, keep_locally=True, opts=on_host
            )
            model_image_ref = self.model_image.image_id
            self.platform_check = command.remote.Command(
                f"{name}-model-image-platform",
                connection=host.connection,
                create=render_platform_check(spec.model.image, platform, cfg.server_type),
                triggers=[self.model_image.image_id],
                opts=pulumi.ResourceOptions(parent=self, depends_on=[self.model_image]),
            )
            model_dependencies: list[pulumi.Resource] = [self.platform_check]
        else:
            self.model_image = docker.Image(
                f"{name}-model-image",
                image_name=spec.model.image,
                # Relative to the project directory (Pulumi's working directory), so that previews made on
                # different machines (an operator's laptop, CI) do not differ by an absolute path.
                build=docker.DockerBuildArgs(
                    context=os.path.relpath(app_dir),
                    dockerfile=os.path.relpath(app_dir / "Dockerfile"),
                    platform=platform,
                ),
                skip_push=True,
                opts=on_host,
            )
            model_image_ref = self.model_image.image_name
            model_dependencies = []
        # Two bearer tokens, each a swarm secret: /admin (the host's cron and operators) and POST /observations
        # (whoever sends ground truth; `pulumi stack output ingestToken --show-secrets`).
        self.admin_token, self.admin_secret = swarm_token(f"{name}-admin", ADMIN_SECRET, self, on_host)
        self.ingest_token, self.ingest_secret = swarm_token(f"{name}-ingest", INGEST_SECRET, self, on_host)
        with_volumes = pulumi.ResourceOptions.merge(on_host, pulumi.ResourceOptions(depends_on=self.volumes))
        self.docker_api = container(
            f"{name}-docker-api", spec.docker_api, self.docker_api_image.image_id, None, with_volumes
        )
        self.traefik = container(
            f"{name}-traefik",
            spec.traefik,
            self.traefik_image.image_id,
            self.network,
            pulumi.ResourceOptions.merge(with_volumes, pulumi.ResourceOptions(depends_on=[self.docker_api])),
        )
        self.model = service(
            f"{name}-model",
            spec.model,
            model_image_ref,
            self.network,
            {ADMIN_SECRET: self.admin_secret, INGEST_SECRET: self.ingest_secret},
            pulumi.ResourceOptions.merge(
                on_host, pulumi.ResourceOptions(depends_on=[self.traefik, *model_dependencies])
            ),
        )
        self.smoke = command.local.Command(
            f"{name}-smoke-check",
            create=host.ipv4.apply(lambda ip: smoke_command(spec.domain, ip, staging=cfg.acme_staging)),
            triggers=[host.server.id, self.traefik.id, self.model.id],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.traefik, self.model, host.dns_a, host.dns_aaaa]),
        )
        self.register_outputs({})
