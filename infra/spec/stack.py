"""The one description of what runs on the VM, free of Pulumi types.

`build_stack` turns validated inputs into container specs (image, command, env, labels, mounts, ports,
healthcheck, restart policy) plus the host layout and the retrain cron entry. The Pulumi components map this to
resources, the local stack (`infra.local`) runs it on a local engine, and the cloud-init renderer prepares the host
for it: the three can only agree, because they read the same data.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from infra.spec.data_access import first_training_job, with_data_credentials
from infra.spec.docker_api import (
    DOCKER_API_CONFIG_FILE,
    DOCKER_API_CONFIG_PATH,
    DOCKER_API_CONTAINER,
    DOCKER_API_VOLUME,
    PROXY_SOCKET_DIR,
    SOCKET,
    docker_api_config,
)
from infra.spec.inputs import StackInputs
from infra.spec.monitoring import (
    ALERTMANAGER_CONFIG_FILE,
    ALERTMANAGER_CONFIG_SECRET,
    ALERTMANAGER_PORT,
    ALERTMANAGER_SERVICE,
    CONFIG_DIR,
    NODE_EXPORTER_PORT,
    NODE_EXPORTER_SERVICE,
    POSTGRES_EXPORTER_PORT,
    POSTGRES_EXPORTER_SERVICE,
    PROMETHEUS_PORT,
    PROMETHEUS_SERVICE,
    PROMETHEUS_UID,
    RETENTION_SIZE,
    RULES_FILE,
    ScrapeTargets,
    alert_rules,
    prometheus_config,
    rules_document,
)
from infra.spec.postgres import (
    DATA_MOUNT,
    PGDATA,
    POSTGRES_DB,
    POSTGRES_PORT,
    POSTGRES_SERVICE,
    POSTGRES_UID,
    POSTGRES_USER,
)
from infra.spec.postgres import SOCKET_DIR as POSTGRES_SOCKET_DIR
from infra.spec.traefik import (
    ACME_CA_BUNDLE_PATH,
    METRICS_PORT,
    PROVIDER_REFRESH_S,
    PROXY_HEALTH_INTERVAL_S,
    TLS_FILE,
    TRAEFIK_TMPFS_MB,
    WEB_PORT,
    WEBSECURE_PORT,
    go_runtime_env,
    model_labels,
    tls_options_yaml,
    traefik_env,
    traefik_flags,
)
from infra.spec.types import (
    ConfigFile,
    Confinement,
    ContainerSpec,
    Healthcheck,
    HostDirectory,
    MiB,
    MonitoringSpec,
    Mount,
    PublishedPort,
    RestartPolicy,
    RolloutPolicy,
    SecretFile,
    ServiceSpec,
    StackSpec,
)

NETWORK = "mlapi"  # an attachable overlay: the model's tasks and the Traefik container meet on it
TRAEFIK_CONTAINER = "mlapi-traefik"
MODEL_SERVICE = "mlapi-model"
MODEL_PORT = 8000
MODEL_UID = 10001  # the image's non-root user (app/Dockerfile)
TRAEFIK_UID = 10002  # Traefik runs as this user: it owns its certificates and nothing else on the host
RETRAIN_LOG = "/var/log/mlapi-retrain.log"
APP_COMMAND = "/usr/local/bin/mlapi-app"  # on the host: `mlapi-app retrain|versions|rollback vN|drift`
ADMIN_SECRET = "mlapi-admin-token"  # noqa: S105 — swarm secrets are immutable: the real name carries a digest of the value
ADMIN_SECRET_FILE = "admin_token"  # noqa: S105 — /run/secrets/admin_token inside each task
INGEST_SECRET = "mlapi-ingest-token"  # noqa: S105 — the bearer token of POST /observations, likewise
INGEST_SECRET_FILE = "ingest_token"  # noqa: S105
SECRETS = (ADMIN_SECRET, INGEST_SECRET)  # every swarm secret the model service mounts on one node
# With workers: PostgreSQL's password (its service) and the URL with it (the model service); one random value.
POSTGRES_PASSWORD_SECRET = "mlapi-postgres-password"  # noqa: S105 — a secret's base name
DATABASE_URL_SECRET = "mlapi-database-url"  # noqa: S105 — likewise
POSTGRES_PASSWORD_FILE = "postgres_password"  # noqa: S105 — a file name under /run/secrets
DATABASE_URL_FILE = "database_url"
SEED_MARKER = "holds-the-data-volume"  # in the manager's model directory: the replicas there seed the shared registry
# Swarm on one node: the manager talks to itself on loopback, so 2377 is not exposed on any public interface.
SWARM_ADVERTISE_ADDR = "127.0.0.1"
SWARM_LISTEN_ADDR = "127.0.0.1:2377"
NODE_LABEL = "mlapi.node"  # each node's own value (the manager: "manager"; a worker: its hostname)
PLACEMENT_SPREAD = f"spread=node.labels.{NODE_LABEL}"
# A stopping task keeps serving (health 503) this long: Traefik has polled the swarm API and health-checked it by then.
DRAIN_S = PROVIDER_REFRESH_S + PROXY_HEALTH_INTERVAL_S + 2


def app_script() -> str:
    """``mlapi-app <command>`` on the host: ``python -m app <command>`` inside one healthy replica, on its loopback,
    so cron's retrain and an operator's ``mlapi-app versions`` use the private routes, never the public proxy."""
    return f"""#!/bin/sh
# Installed by the deploy step (infra/spec/stack.py: app_script). Usage: mlapi-app retrain|versions|rollback vNNNN|drift
set -eu
task=$(docker ps --quiet --filter label=com.docker.swarm.service.name={MODEL_SERVICE} --filter health=healthy \
  | head -n 1)
if [ -z "$task" ]; then
  echo "mlapi-app: no healthy replica of {MODEL_SERVICE} on this node (docker service ps {MODEL_SERVICE})" >&2
  exit 1
fi
exec docker exec "$task" python -m app "$@"
"""


HOST_RESERVED_MB = 512  # the OS, dockerd, sshd, cron's retrain client
POSTGRES_MEMORY_MB = 512  # with workers, on the manager
TRAEFIK_MEMORY_MB = 256
DOCKER_API_MEMORY_MB = 64
PROMETHEUS_MEMORY_MB = 200  # a few thousand series; with Alertmanager, the 250 MB monitoring may take on the VM
ALERTMANAGER_MEMORY_MB = 50
NODE_EXPORTER_MEMORY_MB = 32  # on every node
POSTGRES_EXPORTER_MEMORY_MB = 32  # with workers, on the manager
REPLICA_MEMORY_MB = (384, 2048)  # a replica below 384 MiB cannot retrain; above 2 GiB it has no use for more
TRAEFIK_PROCESS_LIMIT = 1024  # Go threads: a few per core plus one per blocking syscall
REPLICA_PROCESS_LIMIT = 512  # uvicorn, its thread pool, BLAS threads per core, the log writer


def replicas_per_node(inputs: StackInputs) -> int:
    """The most replicas one node holds: its share of the swarm's, rounded up."""
    return -(-inputs.model_replicas // inputs.nodes)


def replica_memory_mb(inputs: StackInputs) -> int:
    """What is left after the host and the edge (every node is sized as if it ran them, as the manager does),
    shared by a node's replicas plus the one a start-first update adds."""
    free = inputs.server_memory_mb - HOST_RESERVED_MB - TRAEFIK_MEMORY_MB - DOCKER_API_MEMORY_MB
    free -= PROMETHEUS_MEMORY_MB + ALERTMANAGER_MEMORY_MB + NODE_EXPORTER_MEMORY_MB
    if inputs.nodes > 1:
        free -= POSTGRES_MEMORY_MB + POSTGRES_EXPORTER_MEMORY_MB
    low, high = REPLICA_MEMORY_MB
    return max(low, min(high, free // (replicas_per_node(inputs) + 1)))


def postgres_service(inputs: StackInputs, root: str) -> ServiceSpec:
    """PostgreSQL on the manager, its data on the volume: one task, replaced stop-first (two servers on one data
    directory would corrupt it), reached by the replicas at mlapi-postgres:5432 on the overlay."""
    return ServiceSpec(
        name=POSTGRES_SERVICE,
        image=inputs.postgres_image,
        command=(),  # the image's entrypoint (it initializes an empty data directory) and command (`postgres`)
        env={
            "POSTGRES_USER": POSTGRES_USER,
            "POSTGRES_DB": POSTGRES_DB,
            "POSTGRES_PASSWORD_FILE": f"/run/secrets/{POSTGRES_PASSWORD_FILE}",
            "PGDATA": PGDATA,
        },
        labels={},
        mounts=(Mount(f"{root}/postgres", DATA_MOUNT),),
        healthcheck=Healthcheck(
            ("CMD", "pg_isready", "-h", "127.0.0.1", "-p", str(POSTGRES_PORT), "-U", POSTGRES_USER, "-d", POSTGRES_DB),
            interval_s=5,
            timeout_s=3,
            retries=3,
            start_period_s=60,
        ),
        replicas=1,
        update=RolloutPolicy(failure_action="rollback", order="stop-first"),
        rollback=RolloutPolicy(failure_action="pause", order="stop-first"),
        restart=RestartPolicy(),
        secrets=(SecretFile(POSTGRES_PASSWORD_SECRET, POSTGRES_PASSWORD_FILE, POSTGRES_UID),),
        stop_grace_period_s=30,  # a fast shutdown checkpoints first
        confinement=Confinement(memory_bytes=POSTGRES_MEMORY_MB * MiB, tmpfs_path=POSTGRES_SOCKET_DIR),
        constraints=("node.role==manager",),
        user=f"{POSTGRES_UID}:{POSTGRES_UID}",
        init=False,  # postgres is its own PID 1 and reaps its children
    )


def monitoring_files(inputs: StackInputs, root: str) -> tuple[ConfigFile, ...]:
    """prometheus.yml and the alert rules, in the directory Prometheus mounts read-only."""
    targets = ScrapeTargets(
        MODEL_SERVICE,
        MODEL_PORT,
        f"{TRAEFIK_CONTAINER}:{METRICS_PORT}",
        f"{ALERTMANAGER_SERVICE}:{ALERTMANAGER_PORT}",
        postgres_exporter=f"{POSTGRES_EXPORTER_SERVICE}:{POSTGRES_EXPORTER_PORT}" if inputs.nodes > 1 else None,
    )
    rules = alert_rules(inputs.model_replicas, inputs.backups, inputs.latency_objective_ms)
    rules = rules_document(rules, inputs.alert_wait)
    return (
        ConfigFile(f"{root}/prometheus/config/prometheus.yml", prometheus_config(targets, inputs.monitoring_interval_s),
                   0, "0644"),
        ConfigFile(f"{root}/prometheus/config/{RULES_FILE}", yaml.safe_dump(rules, sort_keys=False),
                   0, "0644"),
    )  # fmt: skip


def self_check(port: int, path: str = "/-/healthy") -> Healthcheck:
    """A monitoring service's own health endpoint, asked with the busybox wget their official images are built on
    (the local monitoring image carries Debian's busybox for it): swarm replaces a task that hangs, not only one that
    exits. A slow WAL replay at start is not unhealthy: /-/healthy answers while /-/ready waits. Every 5 s: swarm
    counts a new task only once its first check passed (a deploy waits that long), and the engines here predate the
    start interval that would check sooner only while starting."""
    return Healthcheck(
        ("CMD", "wget", "--spider", "-q", f"http://127.0.0.1:{port}{path}"),
        interval_s=5,
        timeout_s=5,
        retries=3,
        start_period_s=60,
    )


def monitoring_services(inputs: StackInputs, root: str, files: tuple[ConfigFile, ...]) -> MonitoringSpec:
    """Prometheus and Alertmanager on the manager (their data on the volume), on the overlay only: nothing publishes
    their ports (`mlapi` or an SSH tunnel reach them). One task each, replaced stop-first (one writer per data
    directory). Prometheus' files live on the host; a digest of them in its environment rolls it when they change."""
    digest = hashlib.sha256("".join(item.content for item in files).encode()).hexdigest()[:12]
    common = {
        "labels": {},
        "replicas": 1,
        "update": RolloutPolicy(failure_action="rollback", order="stop-first"),
        "rollback": RolloutPolicy(failure_action="pause", order="stop-first"),
        "restart": RestartPolicy(),
        "stop_grace_period_s": 30,
        "constraints": ("node.role==manager",),
        "user": f"{PROMETHEUS_UID}:{PROMETHEUS_UID}",
    }
    prometheus = ServiceSpec(
        name=PROMETHEUS_SERVICE,
        image=inputs.prometheus_image,
        command=(
            "/bin/prometheus",
            f"--config.file={CONFIG_DIR}/prometheus.yml",
            "--storage.tsdb.path=/prometheus",
            f"--storage.tsdb.retention.time={inputs.monitoring_retention}",
            f"--storage.tsdb.retention.size={RETENTION_SIZE}",
            f"--web.listen-address=:{PROMETHEUS_PORT}",
        ),
        env={"MLAPI_CONFIG_DIGEST": digest},
        healthcheck=self_check(PROMETHEUS_PORT),
        mounts=(Mount(f"{root}/prometheus/data", "/prometheus"), Mount(f"{root}/prometheus/config", CONFIG_DIR, True)),
        secrets=(),
        confinement=Confinement(memory_bytes=PROMETHEUS_MEMORY_MB * MiB),
        **common,
    )
    alertmanager = ServiceSpec(
        name=ALERTMANAGER_SERVICE,
        image=inputs.alertmanager_image,
        command=(
            "/bin/alertmanager",
            f"--config.file=/run/secrets/{ALERTMANAGER_CONFIG_FILE}",
            "--storage.path=/alertmanager",
            f"--web.listen-address=:{ALERTMANAGER_PORT}",
            "--cluster.listen-address=",  # one instance: no gossip port, no peer discovery
        ),
        env={},
        healthcheck=self_check(ALERTMANAGER_PORT),
        mounts=(Mount(f"{root}/alertmanager", "/alertmanager"),),
        secrets=(SecretFile(ALERTMANAGER_CONFIG_SECRET, ALERTMANAGER_CONFIG_FILE, PROMETHEUS_UID),),
        confinement=Confinement(memory_bytes=ALERTMANAGER_MEMORY_MB * MiB),
        **common,
    )
    node_exporter = ServiceSpec(
        name=NODE_EXPORTER_SERVICE,
        image=inputs.node_exporter_image,
        # The host's /proc, /sys and root filesystem, read-only: its CPU, memory, disks and network, not the task's.
        command=(
            "/bin/node_exporter",
            "--path.procfs=/host/proc",
            "--path.sysfs=/host/sys",
            "--path.rootfs=/host/root",
            f"--web.listen-address=:{NODE_EXPORTER_PORT}",
            "--collector.filesystem.mount-points-exclude=^/(dev|proc|run|sys|var/lib/docker)($|/)",
        ),
        env={},
        healthcheck=self_check(NODE_EXPORTER_PORT, "/metrics"),
        mounts=(Mount("/proc", "/host/proc", True), Mount("/sys", "/host/sys", True), Mount("/", "/host/root", True)),
        secrets=(),
        confinement=Confinement(memory_bytes=NODE_EXPORTER_MEMORY_MB * MiB),
        global_mode=True,
        **{**common, "constraints": ()},
    )
    postgres_exporter = (
        None
        if inputs.nodes == 1
        else ServiceSpec(
            name=POSTGRES_EXPORTER_SERVICE,
            image=inputs.postgres_exporter_image,
            command=("/bin/postgres_exporter", f"--web.listen-address=:{POSTGRES_EXPORTER_PORT}"),
            # The replicas' database user, its password from the same swarm secret PostgreSQL reads, over the overlay.
            env={
                "DATA_SOURCE_URI": f"{POSTGRES_SERVICE}:{POSTGRES_PORT}/{POSTGRES_DB}?sslmode=disable",
                "DATA_SOURCE_USER": POSTGRES_USER,
                "DATA_SOURCE_PASS_FILE": f"/run/secrets/{POSTGRES_PASSWORD_FILE}",
            },
            healthcheck=self_check(POSTGRES_EXPORTER_PORT, "/metrics"),
            mounts=(),
            secrets=(SecretFile(POSTGRES_PASSWORD_SECRET, POSTGRES_PASSWORD_FILE, PROMETHEUS_UID),),
            confinement=Confinement(memory_bytes=POSTGRES_EXPORTER_MEMORY_MB * MiB),
            **common,
        )
    )
    directories = (
        HostDirectory(f"{root}/prometheus", 0, "0755"),
        HostDirectory(f"{root}/prometheus/config", 0, "0755"),
        HostDirectory(f"{root}/prometheus/data", PROMETHEUS_UID, "0700"),
        HostDirectory(f"{root}/alertmanager", PROMETHEUS_UID, "0700"),
    )
    return MonitoringSpec(
        prometheus,
        alertmanager,
        node_exporter,
        postgres_exporter,
        inputs.monitoring_interval_s,
        directories,
        files,
    )


def build_stack(inputs: StackInputs) -> StackSpec:
    root = inputs.data_root.rstrip("/")
    clustered = inputs.nodes > 1
    traefik = ContainerSpec(
        name=TRAEFIK_CONTAINER,
        image=inputs.traefik_image,
        command=traefik_flags(inputs, NETWORK),
        env={**traefik_env(inputs), **go_runtime_env(TRAEFIK_MEMORY_MB)},
        labels={},
        mounts=(
            Mount(f"{root}/traefik", "/acme"),
            Mount(DOCKER_API_VOLUME, PROXY_SOCKET_DIR, read_only=True, kind="volume"),  # the proxy's socket
            *((Mount(inputs.acme_ca_bundle, ACME_CA_BUNDLE_PATH, read_only=True),) if inputs.acme_ca_bundle else ()),
        ),
        # Unprivileged ports inside the container, so Traefik needs no capability at all; 80/443 on the host.
        ports=tuple(
            PublishedPort(ip, host_port, container_port)
            for container_port, host_port in ((WEB_PORT, inputs.http_port), (WEBSECURE_PORT, inputs.https_port))
            for ip in inputs.publish_ips
        ),
        aliases=inputs.traefik_aliases,
        network=NETWORK,
        user=f"{TRAEFIK_UID}:{TRAEFIK_UID}",
        healthcheck=Healthcheck(("CMD", "traefik", "healthcheck", "--ping"), start_period_s=10),
        confinement=Confinement(
            memory_bytes=TRAEFIK_MEMORY_MB * MiB,
            tmpfs_bytes=TRAEFIK_TMPFS_MB * MiB,
            process_limit=TRAEFIK_PROCESS_LIMIT,
        ),
    )
    docker_api = ContainerSpec(
        name=DOCKER_API_CONTAINER,
        image=inputs.docker_api_image,
        command=("-f", DOCKER_API_CONFIG_PATH),  # both images' entrypoint is `haproxy -W -db`
        env={},
        labels={},
        mounts=(
            Mount(SOCKET, SOCKET, read_only=True),
            Mount(f"{root}/docker-api/{DOCKER_API_CONFIG_FILE}", DOCKER_API_CONFIG_PATH, read_only=True),
            Mount(DOCKER_API_VOLUME, PROXY_SOCKET_DIR, kind="volume"),
        ),
        ports=(),
        aliases=(),
        network=None,  # it listens on a socket in the volume it shares with Traefik
        # root, for the socket (root:docker 0660; with no capability, root passes only as the owner) and nothing else
        user="0:0",
        healthcheck=None,
        confinement=Confinement(memory_bytes=DOCKER_API_MEMORY_MB * MiB),
    )
    model = ServiceSpec(
        name=MODEL_SERVICE,
        image=inputs.model_image,
        command=("python", "-m", "app", "serve"),
        env={
            "MLAPI_DATA_DIR": "/data",
            "MLAPI_PORT": str(MODEL_PORT),
            "MLAPI_ADMIN_TOKEN_FILE": f"/run/secrets/{ADMIN_SECRET_FILE}",
            "MLAPI_INGEST_TOKEN_FILE": f"/run/secrets/{INGEST_SECRET_FILE}",
            "MLAPI_DRAIN_SECONDS": str(DRAIN_S),
            # Every task of the service: during a project switch, a request one generation refuses is answered by
            # the other (app/handover.py).
            "MLAPI_PEERS": f"tasks.{MODEL_SERVICE}:{MODEL_PORT}",
            # RLIMIT_NPROC counts every process of the model's user on the node: all replicas, and one more during
            # a start-first update. Swarm services cannot set ulimits through the provider, so the app sets it.
            "MLAPI_PROCESS_LIMIT": str(REPLICA_PROCESS_LIMIT * (replicas_per_node(inputs) + 1)),
            # With workers: models and logs in PostgreSQL; the manager's replicas (the data volume) seed it.
            **(
                {
                    "MLAPI_DATABASE_URL_FILE": f"/run/secrets/{DATABASE_URL_FILE}",
                    "MLAPI_SEED_MARKER": f"/data/{SEED_MARKER}",
                }
                if clustered
                else {}
            ),
        },
        labels=model_labels(inputs, NETWORK, MODEL_PORT),
        mounts=(Mount(f"{root}/model", "/data"),),
        # Gates traffic twice: swarm counts a task as running only once healthy (so a start-first update waits
        # for it), and kills a task that turns unhealthy.
        healthcheck=Healthcheck(
            (
                "CMD",
                "python",
                "-c",
                f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{MODEL_PORT}/ready', timeout=2)",
            ),
            interval_s=3,
            timeout_s=3,
            retries=3,
            # Failed checks count only after this; a replica that answers earlier is healthy at once. A replica
            # starting on a busy VM under load took over 39 s once: at 30 s it was killed mid-start and the update
            # rolled back. (The first version is trained at image build, app/Dockerfile, not in this window.)
            start_period_s=60,
        ),
        replicas=inputs.model_replicas,
        update=RolloutPolicy(failure_action="rollback"),
        rollback=RolloutPolicy(failure_action="pause"),
        restart=RestartPolicy(),
        secrets=(
            SecretFile(ADMIN_SECRET, ADMIN_SECRET_FILE, MODEL_UID),
            SecretFile(INGEST_SECRET, INGEST_SECRET_FILE, MODEL_UID),
            *((SecretFile(DATABASE_URL_SECRET, DATABASE_URL_FILE, MODEL_UID),) if clustered else ()),
        ),
        stop_grace_period_s=DRAIN_S + 10 + 4,  # drain, then uvicorn's graceful timeout (10 s), plus margin
        confinement=Confinement(memory_bytes=replica_memory_mb(inputs) * MiB),
        # The node count is part of the spec on purpose: adding a node changes it, and the rolling update that
        # follows spreads the replicas onto the new node (swarm never moves running tasks by itself).
        placement_prefs=(PLACEMENT_SPREAD,) if inputs.nodes > 1 else (),
        max_replicas_per_node=replicas_per_node(inputs) + 1 if inputs.nodes > 1 else None,
    )
    if inputs.data_credentials:
        model = with_data_credentials(model, MODEL_UID)
    return StackSpec(
        network=NETWORK,
        traefik=traefik,
        docker_api=docker_api,
        model=model,
        host_directories=(
            HostDirectory(f"{root}/model", MODEL_UID, "0750"),
            HostDirectory(f"{root}/traefik", TRAEFIK_UID, "0700", recursive=True),
            HostDirectory(f"{root}/traefik/dynamic", TRAEFIK_UID, "0700"),
            HostDirectory(f"{root}/docker-api", 0, "0755"),
            *((HostDirectory(f"{root}/postgres", POSTGRES_UID, "0700"),) if clustered else ()),
        ),
        config_files=(
            ConfigFile(f"{root}/traefik/dynamic/{TLS_FILE}", tls_options_yaml(), TRAEFIK_UID),
            ConfigFile(f"{root}/docker-api/{DOCKER_API_CONFIG_FILE}", docker_api_config(), 0, "0644"),
        ),
        app_script=app_script(),
        retrain_cron=f"{inputs.retrain_schedule} root {APP_COMMAND} retrain >> {RETRAIN_LOG} 2>&1",
        domain=inputs.domain,
        postgres=postgres_service(inputs, root) if clustered else None,
        monitoring=monitoring_services(inputs, root, monitoring_files(inputs, root)),
        first_training=first_training_job(model, model.env["MLAPI_DATA_DIR"]) if inputs.data_credentials else None,
    )


def secret_name(base: str, value: str) -> str:
    """Swarm secrets cannot change: a new value gets a new name (a short digest, which reveals nothing usable)."""
    return f"{base}-{hashlib.sha256(value.encode()).hexdigest()[:10]}"


def project_tag(model_image: str, project: Path) -> str:
    """The tag of the model image with a project in it: new when the base image or any file of the project is."""
    return hashlib.sha256(f"{model_image}\0{source_tag(project)}".encode()).hexdigest()[:12]


def source_tag(app_dir: Path) -> str:
    """A tag that changes exactly when the build context changes, so a code change replaces the container."""
    digest = hashlib.sha256()
    for path in sorted(p for p in app_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        if path.suffix in {".pyc", ".whl"}:
            continue
        digest.update(path.relative_to(app_dir).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]
