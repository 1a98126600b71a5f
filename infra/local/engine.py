"""Apply the spec to a Docker engine through its API: this machine's (`make local-up`) or a host's over ssh://
(the VM stand-in test). It does what the Pulumi components declare, from the same spec: swarm mode, the overlay
network, the token secrets, the proxy and Traefik containers and the model's swarm service, then waits for the
rollout the way the Docker provider's converge step does, and says why when swarm rolled an update back.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import docker
from docker import types as api
from docker.types import Healthcheck, Mount

from infra.spec.data_access import FIRST_TRAINING_TIMEOUT_S
from infra.spec.stack import SWARM_ADVERTISE_ADDR, SWARM_LISTEN_ADDR, secret_name
from infra.spec.types import Confinement, ContainerSpec, RolloutPolicy, ServiceSpec, StackSpec
from infra.spec.types import Healthcheck as SpecHealthcheck

HASH_LABEL = "mlapi.local.config-hash"  # lets a second `up` keep what has not changed
NANOSECONDS = 1_000_000_000
SERVICE_LABEL = "com.docker.swarm.service.name"


class RolloutFailed(RuntimeError):
    """The service did not converge: swarm rolled the update back (the old version serves) or it timed out."""


def config_hash(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _ns(seconds: float) -> int:
    return int(seconds * NANOSECONDS)


def _healthcheck(check: SpecHealthcheck) -> Healthcheck:
    return Healthcheck(
        test=list(check.test),
        interval=_ns(check.interval_s),
        timeout=_ns(check.timeout_s),
        retries=check.retries,
        start_period=_ns(check.start_period_s),
    )


# -- swarm mode, network, secret ------------------------------------------------------------------------------
def ensure_swarm(client: docker.DockerClient) -> bool:
    """Join swarm mode as a single-node manager if the engine is not in it; True if this call turned it on."""
    if client.info()["Swarm"]["LocalNodeState"] == "active":
        return False
    client.swarm.init(advertise_addr=SWARM_ADVERTISE_ADDR, listen_addr=SWARM_LISTEN_ADDR)
    return True


def ensure_network(client: docker.DockerClient, name: str) -> None:
    """The attachable overlay network (tasks and plain containers meet on it)."""
    try:
        existing = client.networks.get(name)
    except docker.errors.NotFound:
        existing = None
    if existing is not None:
        if existing.attrs["Driver"] == "overlay":
            return
        existing.remove()  # a bridge network of the same name, from before swarm mode
    client.networks.create(name, driver="overlay", attachable=True, scope="swarm")


def ensure_secret(client: docker.DockerClient, base: str, value: str) -> tuple[str, str]:
    """The secret holding ``value`` as (id, name); a new value is a new secret (swarm secrets are immutable)."""
    name = secret_name(base, value)
    for secret in client.secrets.list(filters={"name": name}):
        if secret.name == name:
            return secret.id, name
    return client.secrets.create(name=name, data=value.encode()).id, name


def remove_unused_secrets(client: docker.DockerClient, base: str, keep: str) -> None:
    for secret in client.secrets.list(filters={"name": base}):
        if secret.name.startswith(f"{base}-") and secret.name != keep:
            with contextlib.suppress(docker.errors.APIError):  # still referenced by a task that is stopping
                secret.remove()


# -- plain containers (Traefik, Pebble) --------------------------------------------------------------------------
def ensure_container(client: docker.DockerClient, name: str, digest: str, create: dict):
    """Keep a running container whose definition is unchanged; otherwise replace it (idempotent `up`)."""
    try:
        existing = client.containers.get(name)
    except docker.errors.NotFound:
        existing = None
    if existing is not None:
        if existing.labels.get(HASH_LABEL) == digest:
            if existing.status != "running":
                start_attached(existing)
            return existing
        existing.remove(force=True)
    create["labels"] = {**create.get("labels", {}), HASH_LABEL: digest}
    container = client.containers.create(name=name, detach=True, **create)
    start_attached(container)
    return container


def start_attached(container, attempts: int = 40) -> None:
    """Start a container on the overlay. Right after the network is made (an `up` after `down`), swarm may not know
    it yet for a plain container ("Could not attach to network mlapi: rpc error: code = NotFound"): retry briefly."""
    for attempt in range(attempts):
        try:
            container.start()
            return
        except docker.errors.APIError as exc:
            if "Could not attach to network" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.25)


def container_create_args(client: docker.DockerClient, spec: ContainerSpec) -> dict:
    """One spec container as docker-py arguments: every field comes from the spec, nothing is added here."""
    ports: dict[str, list[tuple[str, int]]] = {}
    for port in spec.ports:
        ports.setdefault(f"{port.container_port}/tcp", []).append((port.host_ip, port.host_port))
    network = (
        {
            "network": spec.network,
            "networking_config": {spec.network: client.api.create_endpoint_config(aliases=list(spec.aliases))},
        }
        if spec.network
        else {"network_mode": "none"}
    )
    return {
        "image": spec.image,
        "command": list(spec.command),
        "environment": dict(spec.env),
        "labels": dict(spec.labels),
        "mounts": [Mount(target=m.target, source=m.source, type=m.kind, read_only=m.read_only) for m in spec.mounts],
        "ports": ports,
        **({"healthcheck": _healthcheck(spec.healthcheck)} if spec.healthcheck else {}),
        "restart_policy": {"Name": spec.restart},
        "user": spec.user,
        **_confined_container(spec.confinement),
        **network,
    }


def _confined_container(confinement: Confinement) -> dict:
    return {
        "cap_drop": list(confinement.cap_drop),
        "cap_add": list(confinement.cap_add),
        "read_only": confinement.read_only_root,
        "tmpfs": {confinement.tmpfs_path: f"size={confinement.tmpfs_bytes}"},
        "mem_limit": confinement.memory_bytes,
        "security_opt": ["no-new-privileges:true"] if confinement.no_new_privileges else [],
        "ulimits": [api.Ulimit(name=name, soft=limit, hard=limit) for name, limit in confinement.ulimits],
    }


def run_container(client: docker.DockerClient, spec: ContainerSpec):
    args = container_create_args(client, spec)
    image_id = client.images.get(spec.image).id
    digest = config_hash(args["command"], args["environment"], args["labels"], spec, image_id)
    return ensure_container(client, spec.name, digest, args)


# -- the model's swarm service ---------------------------------------------------------------------------------
def _rollout(policy: RolloutPolicy, kind: type[api.UpdateConfig]) -> api.UpdateConfig:
    return kind(
        parallelism=policy.parallelism,
        delay=_ns(policy.delay_s),
        failure_action=policy.failure_action,
        monitor=_ns(policy.monitor_s),
        max_failure_ratio=policy.max_failure_ratio,
        order=policy.order,
    )


def service_args(spec: ServiceSpec, network: str, secrets: dict[str, tuple[str, str]]) -> dict:
    """The service as docker-py's create/update arguments: every field comes from the spec."""
    confinement = spec.confinement
    container = api.ContainerSpec(
        image=spec.image,
        command=list(spec.command) or None,
        args=list(spec.args) or None,
        env=[f"{key}={value}" for key, value in spec.env.items()],
        mounts=[Mount(target=m.target, source=m.source, type=m.kind, read_only=m.read_only) for m in spec.mounts]
        + [Mount(target=confinement.tmpfs_path, source=None, type="tmpfs", tmpfs_size=confinement.tmpfs_bytes)],
        healthcheck=_healthcheck(spec.healthcheck) if spec.healthcheck else None,
        stop_grace_period=_ns(spec.stop_grace_period_s),
        read_only=confinement.read_only_root,
        cap_drop=list(confinement.cap_drop),
        cap_add=list(confinement.cap_add) or None,
        secrets=[
            api.SecretReference(
                secrets[item.secret][0],
                secrets[item.secret][1],
                filename=item.file_name,
                uid=str(item.uid),
                gid=str(item.uid),
                mode=item.mode,
            )
            for item in spec.secrets
        ],
        init=spec.init,
        user=spec.user,
    )
    restart = spec.restart
    placement = (
        api.Placement(
            constraints=list(spec.constraints) or None,
            preferences=[tuple(pref.split("=", 1)) for pref in spec.placement_prefs] or None,
            maxreplicas=spec.max_replicas_per_node,
        )
        if spec.placement_prefs or spec.constraints
        else None
    )
    return {
        "task_template": api.TaskTemplate(
            container_spec=container,
            restart_policy=api.RestartPolicy(
                condition=restart.condition,
                delay=_ns(restart.delay_s),
                max_attempts=restart.max_attempts,
                window=_ns(restart.window_s),
            ),
            resources=api.Resources(mem_limit=confinement.memory_bytes),
            networks=[network],
            placement=placement,
        ),
        "name": spec.name,
        "labels": dict(spec.labels),
        "mode": api.ServiceMode("global")
        if spec.global_mode
        else api.ServiceMode("replicated-job", concurrency=1)
        if spec.job
        else api.ServiceMode("replicated", replicas=spec.replicas),
        # A job is never updated, rolled back or reached.
        **(
            {}
            if spec.job
            else {
                "update_config": _rollout(spec.update, api.UpdateConfig),
                "rollback_config": _rollout(spec.rollback, api.RollbackConfig),
                "endpoint_spec": api.EndpointSpec(mode=spec.endpoint_mode),
            }
        ),
    }


@dataclass(frozen=True)
class Rollout:
    action: str  # created | updated | unchanged
    seconds: float


def apply_service(
    client: docker.DockerClient,
    spec: ServiceSpec,
    network: str,
    secrets: dict[str, tuple[str, str]],
    *,
    timeout: float = 600,
) -> Rollout:
    """Create the service, or update it in place (a rolling, start-first update), and wait until it converged."""
    started = time.monotonic()
    args = service_args(spec, network, secrets)
    digest = config_hash(args, client.images.get(spec.image).id)
    args["labels"][HASH_LABEL] = digest
    try:
        current = client.api.inspect_service(spec.name)
    except docker.errors.NotFound:
        current = None
    if current is None:
        client.api.create_service(**args)
        action = "created"
    elif current["Spec"].get("Labels", {}).get(HASH_LABEL) == digest:
        return Rollout("unchanged", 0.0)
    else:
        client.api.update_service(current["ID"], current["Version"]["Index"], **args)
        action = "updated"
        after = client.api.inspect_service(spec.name)
        if after["Spec"]["TaskTemplate"] == current["Spec"]["TaskTemplate"]:
            # Only service-level fields changed (labels such as Traefik's routing and limits, the replica count):
            # no task is replaced, so no rollout status will come; a stale one from an earlier update must not count.
            deadline, wanted = time.monotonic() + timeout, desired_tasks(client, spec)
            while len(running_tasks(client, spec.name)) < wanted:
                if time.monotonic() > deadline:
                    raise RolloutFailed(f"service {spec.name}: fewer than {wanted} tasks running")
                time.sleep(0.5)
            return Rollout("relabelled", round(time.monotonic() - started, 2))
    wait_for_rollout(client, spec.name, desired_tasks(client, spec), timeout=timeout, updating=action == "updated")
    return Rollout(action, round(time.monotonic() - started, 2))


def desired_tasks(client: docker.DockerClient, spec: ServiceSpec) -> int:
    """How many tasks the service runs when converged: its replicas, or (global) one on every node that takes
    tasks."""
    if not spec.global_mode:
        return spec.replicas
    nodes = client.api.nodes()
    return sum(1 for n in nodes if n["Status"]["State"] == "ready" and n["Spec"]["Availability"] == "active")


def running_tasks(client: docker.DockerClient, name: str) -> list[dict]:
    tasks = client.api.tasks(filters={"service": name, "desired-state": "running"})
    return [task for task in tasks if task["Status"]["State"] == "running"]


def failed_task_errors(client: docker.DockerClient, name: str, limit: int = 3) -> list[str]:
    tasks = sorted(client.api.tasks(filters={"service": name}), key=lambda t: t["CreatedAt"], reverse=True)
    errors = [f"{t['Status']['State']}: {t['Status'].get('Err') or t['Status'].get('Message')}" for t in tasks]
    return [error for error in errors if not error.startswith(("running", "shutdown: shutdown"))][:limit]


def wait_for_rollout(
    client: docker.DockerClient, name: str, replicas: int, *, timeout: float, updating: bool = True
) -> None:
    """Converged: the update completed (or, for a new service, all replicas run healthy). Swarm gave up: raise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        service = client.api.inspect_service(name)
        status = service.get("UpdateStatus") or {}
        state = status.get("State")
        if state in ("rollback_started", "rollback_completed", "paused", "rollback_paused"):
            if state == "rollback_started":  # wait for the old version to be back, then report
                time.sleep(1)
                continue
            raise RolloutFailed(
                f"the update of service {name} did not converge and swarm {state.replace('_', ' ')}: "
                f"{status.get('Message', '')}. The previous version keeps serving. Recent task errors: "
                f"{'; '.join(failed_task_errors(client, name)) or 'none recorded'}. "
                f"Inspect: docker service ps --no-trunc {name}"
            )
        done = state == "completed" or (not updating and state is None)
        if done and len(running_tasks(client, name)) >= replicas:
            return
        time.sleep(1)
    raise RolloutFailed(
        f"service {name} did not converge within {timeout:.0f} s; recent task errors: "
        f"{'; '.join(failed_task_errors(client, name)) or 'none recorded'} (docker service ps --no-trunc {name})"
    )


def remove_service(client: docker.DockerClient, name: str, timeout: float = 60) -> None:
    """Remove the service and wait until its containers have exited (graceful: each task gets its grace period)."""
    with contextlib.suppress(docker.errors.NotFound):
        client.api.remove_service(name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and client.containers.list(filters={"label": f"{SERVICE_LABEL}={name}"}):
        time.sleep(0.5)


def run_job(
    client: docker.DockerClient, spec: ServiceSpec, network: str, secrets: dict[str, tuple[str, str]], timeout: float
) -> str:
    """Run a one-shot job (``spec.job``) to completion, as the deploy step does on the host
    (infra/host/scripts/run-job.sh): a previous run's service is replaced; its output is returned, or raised with
    swarm's error when the task failed or did not finish within ``timeout`` seconds. The service is removed after."""
    remove_service(client, spec.name)
    client.api.create_service(**service_args(spec, network, secrets))
    deadline, state = time.monotonic() + timeout, "new"
    try:
        while time.monotonic() < deadline:
            tasks = client.api.tasks(filters={"service": spec.name})
            state = tasks[0]["Status"]["State"] if tasks else "new"
            if state in ("complete", "failed", "rejected", "orphaned"):
                break
            time.sleep(1)
        output = b"".join(
            client.api.service_logs(spec.name, stdout=True, stderr=True, follow=False, timestamps=False)
        ).decode(errors="replace")
        if state != "complete":
            errors = "; ".join(failed_task_errors(client, spec.name)) or f"still {state} after {timeout:.0f} s"
            raise RolloutFailed(f"the job {spec.name} did not complete ({errors}); its output:\n{output[-4000:]}")
        return output
    finally:
        remove_service(client, spec.name)


# -- the whole stack -----------------------------------------------------------------------------------------------
def deploy_stack(client: docker.DockerClient, spec: StackSpec, tokens: dict[str, str]) -> Rollout:
    """What `pulumi up` does on the host, in the same order: swarm mode, network, secrets, Traefik, the services
    (PostgreSQL first, with workers; the monitoring last, its services at once).
    ``tokens``: the value of each swarm secret the services mount, by base name."""
    missing = sorted(set(spec.secret_bases) - set(tokens))
    if missing:
        raise ValueError(f"deploy_stack: no value for the secrets {missing}")
    ensure_swarm(client)
    ensure_network(client, spec.network)
    secrets = {base: ensure_secret(client, base, value) for base, value in tokens.items()}
    run_container(client, spec.docker_api)
    run_container(client, spec.traefik)
    if spec.postgres is not None:
        apply_service(client, spec.postgres, spec.network, secrets)
    if spec.first_training is not None:
        run_job(client, spec.first_training, spec.network, secrets, FIRST_TRAINING_TIMEOUT_S)
    rollout = apply_service(client, spec.model, spec.network, secrets)
    if spec.monitoring is not None:
        # At once: each waits for its first passing health check, and none needs another to start (Prometheus
        # retries a scrape or an alert until its target answers).
        watching = spec.monitoring.services
        with ThreadPoolExecutor(len(watching)) as pool:
            list(pool.map(lambda service: apply_service(client, service, spec.network, secrets), watching))
    for base, (_, name) in secrets.items():
        remove_unused_secrets(client, base, keep=name)
    return rollout
