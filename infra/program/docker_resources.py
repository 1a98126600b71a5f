"""Spec containers and services as pulumi-docker resources: every field comes from the spec (infra/spec/stack.py),
nothing is added here, so the Pulumi program and the local stack (infra/local/engine.py) run the same thing."""

from __future__ import annotations

import base64

import pulumi
import pulumi_docker as docker
import pulumi_random as random

from infra.spec.durations import go_duration
from infra.spec.stack import secret_name
from infra.spec.types import ContainerSpec, MiB, ServiceSpec

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


def swarm_secret(
    resource_name: str, base: str, value: pulumi.Output[str], opts: pulumi.ResourceOptions
) -> docker.Secret:
    """A swarm secret holding ``value`` (a new value gets a new secret name: swarm secrets are immutable)."""
    return docker.Secret(
        resource_name,
        name=value.apply(lambda plain: secret_name(base, plain)),
        data=value.apply(lambda plain: base64.urlsafe_b64encode(plain.encode()).decode()),
        opts=opts,
    )


def swarm_token(
    name: str, base: str, parent: pulumi.Resource, on_host: pulumi.ResourceOptions
) -> tuple[random.RandomPassword, docker.Secret]:
    """A random bearer token and the swarm secret holding it."""
    token = random.RandomPassword(f"{name}-token", length=48, special=False, opts=pulumi.ResourceOptions(parent=parent))
    return token, swarm_secret(f"{name}-secret", base, token.result, on_host)


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
                commands=list(spec.command) or None,
                args=list(spec.args) or None,
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
                healthcheck=(
                    docker.ServiceTaskSpecContainerSpecHealthcheckArgs(**_health(spec.healthcheck))
                    if spec.healthcheck
                    else None
                ),
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
                user=spec.user,
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
            placement=docker.ServiceTaskSpecPlacementArgs(
                prefs=list(spec.placement_prefs) or None,
                max_replicas=spec.max_replicas_per_node,
                constraints=list(spec.constraints) or None,
            )
            if spec.placement_prefs or spec.constraints
            else None,
        ),
        mode=docker.ServiceModeArgs(global_=True)
        if spec.global_mode
        else docker.ServiceModeArgs(replicated=docker.ServiceModeReplicatedArgs(replicas=spec.replicas)),
        update_config=docker.ServiceUpdateConfigArgs(**_rollout(spec.update)),
        rollback_config=docker.ServiceRollbackConfigArgs(**_rollout(spec.rollback)),
        endpoint_spec=docker.ServiceEndpointSpecArgs(mode=spec.endpoint_mode),
        converge_config=docker.ServiceConvergeConfigArgs(delay=go_duration(5), timeout=go_duration(CONVERGE_TIMEOUT_S)),
        opts=opts,
    )
