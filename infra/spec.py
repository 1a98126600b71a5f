"""The one description of what runs on the VM, free of Pulumi types.

`build_stack` turns validated inputs into container specs (image, command, env, labels, mounts, ports,
healthcheck, restart policy) plus the host layout and the retrain cron entry. The Pulumi components map this to
resources, the local stack (`infra.local`) runs it on a local engine, and the cloud-init renderer prepares the host
for it: the three can only agree, because they read the same data.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from infra.docker_api import (
    DOCKER_API_CONFIG_FILE,
    DOCKER_API_CONFIG_PATH,
    DOCKER_API_CONTAINER,
    DOCKER_API_IMAGE,
    DOCKER_API_VOLUME,
    PROXY_SOCKET_DIR,
    SOCKET,
    docker_api_config,
)
from infra.durations import go_duration  # noqa: F401 (re-exported: the components spell durations with it)
from infra.postgres_spec import (
    COMMAND as POSTGRES_COMMAND,
)
from infra.postgres_spec import (
    DATA_MOUNT,
    PGDATA,
    POSTGRES_DB,
    POSTGRES_IMAGE,
    POSTGRES_PORT,
    POSTGRES_SERVICE,
    POSTGRES_UID,
    POSTGRES_USER,
)
from infra.traefik import (  # noqa: F401 (re-exported for the components, the local stack and tests)
    ACME_CA_BUNDLE_PATH,
    DNS_TOKEN_FILE,
    LETSENCRYPT_PRODUCTION,
    LETSENCRYPT_STAGING,
    PROVIDER_REFRESH_S,
    PROXY_HEALTH_INTERVAL_S,
    TLS_FILE,
    WEB_PORT,
    WEBSECURE_PORT,
    acme_storage,
    model_labels,
    tls_options_yaml,
    traefik_env,
    traefik_flags,
)

TRAEFIK_VERSION = "3.7.15"  # >= 3.7: retry on status codes with a buffered body (3.6.1: Docker 29, traefik#12253)

NETWORK = "mlapi"  # an attachable overlay: the model's tasks and the Traefik container meet on it
TRAEFIK_CONTAINER = "mlapi-traefik"
MODEL_SERVICE = "mlapi-model"
MODEL_PORT = 8000
MODEL_UID = 10001  # the image's non-root user (app/Dockerfile)
TRAEFIK_UID = 10002  # Traefik runs as this user: it owns its certificates and nothing else on the host
DEFAULT_DATA_ROOT = "/srv/mlapi"
DEFAULT_RETRAIN_SCHEDULE = "0 * * * *"
DEFAULT_MODEL_REPLICAS = 2
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

_DOMAIN = re.compile(r"^(?=.{1,253}$)(?!-)([a-z0-9-]{1,63}(?<!-)\.)+[a-z]{2,63}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_CRON_MACROS = {"@hourly", "@daily", "@weekly", "@monthly", "@yearly", "@annually", "@midnight"}


def check_cron(expression: str) -> str:
    """A five-field cron expression (or @hourly & co.); raises ValueError saying which field is wrong."""
    expression = " ".join(expression.split())
    if expression in _CRON_MACROS:
        return expression
    fields = expression.split(" ")
    if len(fields) != 5:
        raise ValueError(f"{expression!r} must have 5 fields (minute hour day month weekday), has {len(fields)}")
    names = ("minute", "hour", "day-of-month", "month", "day-of-week")
    for text, (low, high), name in zip(fields, _CRON_RANGES, names, strict=True):
        for part in text.split(","):
            base, _, step = part.partition("/")
            if step and (not step.isdigit() or int(step) == 0):
                raise ValueError(f"{name} field {text!r}: step must be a positive number")
            if base == "*":
                continue
            bounds = base.split("-")
            if len(bounds) > 2 or not all(b.isdigit() for b in bounds):
                raise ValueError(f"{name} field {text!r}: use numbers, ranges a-b, lists a,b, steps */n or *")
            if not all(low <= int(b) <= high for b in bounds):
                raise ValueError(f"{name} field {text!r}: values must be within {low}-{high}")
    return expression


class StackInputs(BaseModel):
    """What decides the VM's stack. Production values by default; the local stack overrides a documented few."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: str
    acme_email: str
    acme_staging: bool = False
    retrain_schedule: str = DEFAULT_RETRAIN_SCHEDULE
    model_replicas: int = Field(DEFAULT_MODEL_REPLICAS, ge=1, le=64)  # across every node
    nodes: int = Field(1, ge=1, le=11, description="the manager plus the worker VMs of the swarm")
    server_memory_mb: int = Field(
        4096, ge=1024, description="the smallest node's memory: the containers' limits follow it"
    )
    acme_challenge: Literal["tls", "dns"] = "tls"  # dns: Cloudflare DNS-01, the token in DNS_TOKEN_FILE
    # Addresses whose PROXY protocol header Traefik trusts (a load balancer in front); empty: none is read.
    proxy_protocol_ips: tuple[str, ...] = ()
    public_docs: bool = True  # /docs, /redoc and /openapi.json routed from the internet
    hsts_preload: bool = False  # HSTS with `preload` and the two years hstspreload.org requires
    # Per client address at the edge (429 beyond): one client cannot take the whole VM (~150-200 predictions/s).
    rate_limit_per_s: int = Field(100, ge=1)
    rate_limit_burst: int = Field(200, ge=1)
    in_flight_per_client: int = Field(32, ge=1)
    model_image: str = Field("mlapi-model:latest", description="image the model service runs")
    postgres_image: str = POSTGRES_IMAGE  # with workers only
    traefik_image: str = f"traefik:v{TRAEFIK_VERSION}"
    docker_api_image: str = DOCKER_API_IMAGE
    data_root: str = DEFAULT_DATA_ROOT
    # Local differences (see infra/local.py): where ACME lives, which CA to trust, where ports bind.
    acme_ca_server: str | None = None
    acme_ca_bundle: str | None = Field(None, description="host path of a PEM CA that Traefik trusts for ACME")
    # Every IPv4 and IPv6 interface on the VM (the cloud firewall is the boundary); 127.0.0.1 locally.
    publish_ips: tuple[str, ...] = ("0.0.0.0", "::")  # noqa: S104
    http_port: int = Field(80, ge=1, le=65535)
    https_port: int = Field(443, ge=1, le=65535)
    traefik_aliases: tuple[str, ...] = ()

    @field_validator("domain")
    @classmethod
    def _fqdn(cls, value: str) -> str:
        value = value.strip().lower().rstrip(".")
        if not _DOMAIN.match(value):
            raise ValueError(f"{value!r} is not a fully-qualified domain name like api.example.com")
        return value

    @field_validator("acme_email")
    @classmethod
    def _email(cls, value: str) -> str:
        if not _EMAIL.match(value.strip()):
            raise ValueError(f"{value!r} is not an email address like ops@example.com")
        return value.strip()

    @field_validator("retrain_schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        return check_cron(value)

    @property
    def ca_server(self) -> str:
        if self.acme_ca_server:
            return self.acme_ca_server
        return LETSENCRYPT_STAGING if self.acme_staging else LETSENCRYPT_PRODUCTION


@dataclass(frozen=True)
class Mount:
    source: str  # a host path, or a named volume's name
    target: str
    read_only: bool = False
    kind: str = "bind"  # bind | volume


@dataclass(frozen=True)
class PublishedPort:
    host_ip: str
    host_port: int
    container_port: int


@dataclass(frozen=True)
class Healthcheck:
    test: tuple[str, ...]
    interval_s: int = 10
    timeout_s: int = 5
    retries: int = 3
    start_period_s: int = 60


@dataclass(frozen=True)
class RolloutPolicy:
    """How swarm replaces tasks during an update (or a rollback)."""

    failure_action: str  # rollback | pause | continue
    parallelism: int = 1
    order: str = "start-first"  # the new task is healthy before the old one stops
    monitor_s: int = 10  # a task failing this soon after it started counts as a failed update
    delay_s: int = 0
    max_failure_ratio: float = 0.0


@dataclass(frozen=True)
class RestartPolicy:
    condition: str = "any"
    delay_s: int = 2
    max_attempts: int = 0  # forever: a crashed replica always comes back
    window_s: int = 0


@dataclass(frozen=True)
class SecretFile:
    secret: str  # the swarm secret's base name (ADMIN_SECRET)
    file_name: str  # under /run/secrets/
    uid: int
    mode: int = 0o400


@dataclass(frozen=True)
class Workload:
    """What any process the spec runs has: a name, an image and how it is started, configured and checked."""

    name: str
    image: str
    command: tuple[str, ...]
    env: dict[str, str]
    labels: dict[str, str]
    mounts: tuple[Mount, ...]
    healthcheck: Healthcheck | None  # None: the image's own (the Docker API proxy has no client to check itself with)


MiB = 1024 * 1024


@dataclass(frozen=True)
class Confinement:
    """Least privilege for a process the spec runs: no capabilities but those named, a read-only root filesystem
    with a small tmpfs at /tmp, a memory limit. ``no_new_privileges`` applies to containers (swarm services cannot
    set it before Docker 27's API; the model runs as a non-root user with no capabilities anyway)."""

    memory_bytes: int
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ("ALL",)
    read_only_root: bool = True
    tmpfs_path: str = "/tmp"  # noqa: S108 (a private tmpfs inside the container)
    tmpfs_bytes: int = 64 * MiB
    no_new_privileges: bool = True
    # Processes and threads of the container's user (RLIMIT_NPROC): a fork bomb stops there, not at the host's limit.
    # Root is exempt from it (the kernel's rule), so the proxy has none; the Docker provider has no pids limit field.
    process_limit: int | None = None

    @property
    def ulimits(self) -> tuple[tuple[str, int], ...]:
        """(name, soft = hard limit) for a plain container's ulimits."""
        return () if self.process_limit is None else (("nproc", self.process_limit),)


@dataclass(frozen=True)
class ServiceSpec(Workload):
    """A replicated swarm service. ``labels`` are service labels, which Traefik's swarm provider reads."""

    replicas: int
    update: RolloutPolicy
    rollback: RolloutPolicy
    restart: RestartPolicy
    secrets: tuple[SecretFile, ...]
    stop_grace_period_s: int
    endpoint_mode: str = "dnsrr"  # Traefik balances across task IPs; swarm's VIP (IPVS) is not needed
    # With several nodes: spread over the nodes' labels, at most one more than a node's share on any node.
    placement_prefs: tuple[str, ...] = ()
    max_replicas_per_node: int | None = None
    constraints: tuple[str, ...] = ()  # e.g. node.role==manager: where the data volume is
    # A service's `command` replaces the image's entrypoint (swarm's Command); `args` go to the entrypoint.
    args: tuple[str, ...] = ()
    user: str | None = None  # uid:gid; None: the image's own
    init: bool = True  # tini as PID 1, so a signal to the task reaches uvicorn
    # A replica holds the model and, while it retrains, the observations it fits on (bounded by the row cap).
    confinement: Confinement = Confinement(memory_bytes=1024 * MiB)


@dataclass(frozen=True)
class ContainerSpec(Workload):
    """A plain container (Traefik, the Docker API proxy): its network (with the aliases; None: no network at all),
    published ports and user."""

    ports: tuple[PublishedPort, ...]
    aliases: tuple[str, ...]
    network: str | None
    user: str  # uid:gid, explicit for every container (an image's default user is not the spec's decision)
    confinement: Confinement
    restart: str = "unless-stopped"


@dataclass(frozen=True)
class HostDirectory:
    path: str
    owner_uid: int
    mode: str
    recursive: bool = False  # own the contents too (a volume from before Traefik ran as TRAEFIK_UID holds root's)


@dataclass(frozen=True)
class ConfigFile:
    """A file the deploy step writes onto the data volume at every deploy (generated, never edited by hand)."""

    path: str
    content: str
    owner_uid: int
    mode: str = "0600"


@dataclass(frozen=True)
class StackSpec:
    network: str
    traefik: ContainerSpec
    docker_api: ContainerSpec  # the only holder of the Docker socket (infra/docker_api.py)
    model: ServiceSpec
    host_directories: tuple[HostDirectory, ...]
    app_script: str  # installed on the host as APP_COMMAND
    retrain_cron: str
    domain: str
    config_files: tuple[ConfigFile, ...] = ()  # Traefik's dynamic configuration, the Docker API proxy's
    postgres: ServiceSpec | None = None  # with workers: the shared store of models and logs, on the manager

    @property
    def services(self) -> tuple[ServiceSpec, ...]:
        """In the order they start: the database before the replicas that need it."""
        return (*((self.postgres,) if self.postgres else ()), self.model)

    @property
    def secret_bases(self) -> tuple[str, ...]:
        """Every swarm secret the services mount, by base name."""
        return tuple(dict.fromkeys(item.secret for service in self.services for item in service.secrets))

    @property
    def volumes(self) -> tuple[str, ...]:
        """The named Docker volumes the containers mount (the deployment creates them)."""
        mounts = (*self.traefik.mounts, *self.docker_api.mounts, *self.model.mounts)
        return tuple(sorted({m.source for m in mounts if m.kind == "volume"}))


def app_script() -> str:
    """``mlapi-app <command>`` on the host: ``python -m app <command>`` inside one healthy replica, on its loopback,
    so cron's retrain and an operator's ``mlapi-app versions`` use the private routes, never the public proxy."""
    return f"""#!/bin/sh
# Installed by the deploy step (infra/spec.py: app_script). Usage: mlapi-app retrain|versions|rollback vNNNN|drift
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
    if inputs.nodes > 1:
        free -= POSTGRES_MEMORY_MB
    low, high = REPLICA_MEMORY_MB
    return max(low, min(high, free // (replicas_per_node(inputs) + 1)))


def postgres_service(inputs: StackInputs, root: str) -> ServiceSpec:
    """PostgreSQL on the manager, its data on the volume: one task, replaced stop-first (two servers on one data
    directory would corrupt it), reached by the replicas at mlapi-postgres:5432 on the overlay."""
    return ServiceSpec(
        name=POSTGRES_SERVICE,
        image=inputs.postgres_image,
        command=(),  # the image's entrypoint initializes an empty data directory
        args=POSTGRES_COMMAND,
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
        confinement=Confinement(memory_bytes=POSTGRES_MEMORY_MB * MiB),
        constraints=("node.role==manager",),
        user=f"{POSTGRES_UID}:{POSTGRES_UID}",
        init=False,  # postgres is its own PID 1 and reaps its children
    )


def build_stack(inputs: StackInputs) -> StackSpec:
    root = inputs.data_root.rstrip("/")
    clustered = inputs.nodes > 1
    traefik = ContainerSpec(
        name=TRAEFIK_CONTAINER,
        image=inputs.traefik_image,
        command=traefik_flags(inputs, NETWORK),
        env=traefik_env(inputs),
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
        confinement=Confinement(memory_bytes=TRAEFIK_MEMORY_MB * MiB, process_limit=TRAEFIK_PROCESS_LIMIT),
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
            start_period_s=30,
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
    )


def secret_name(base: str, value: str) -> str:
    """Swarm secrets cannot change: a new value gets a new name (a short digest, which reveals nothing usable)."""
    return f"{base}-{hashlib.sha256(value.encode()).hexdigest()[:10]}"


def source_tag(app_dir: Path) -> str:
    """A tag that changes exactly when the build context changes, so a code change replaces the container."""
    digest = hashlib.sha256()
    for path in sorted(p for p in app_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        if path.suffix in {".pyc", ".whl"}:
            continue
        digest.update(path.relative_to(app_dir).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]
