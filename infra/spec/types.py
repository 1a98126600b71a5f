"""The spec's data types: what runs (containers, services), how it is confined, rolled out and checked, and what
the deploy writes onto the host. Plain frozen dataclasses, free of Pulumi and Docker types; infra/spec/stack.py builds
them, the Pulumi components and the local engine map them."""

from __future__ import annotations

from dataclasses import dataclass

from infra.spec.monitoring import AlertRoutes, alertmanager_config


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

    replicas: int  # with global_mode: ignored, one task on every node
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
    global_mode: bool = False  # one task on every node (the node exporter) instead of ``replicas``
    job: bool = False  # run once to completion (swarm's replicated-job), not kept running
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
class MonitoringSpec:
    """Prometheus and Alertmanager on the manager, a node exporter on every node. Alertmanager's configuration is a
    swarm secret (it holds the webhook URL and the SMTP password): ``alertmanager_config(routes)`` is its value."""

    prometheus: ServiceSpec
    alertmanager: ServiceSpec
    node_exporter: ServiceSpec
    postgres_exporter: ServiceSpec | None  # with workers: PostgreSQL's own metrics
    interval_s: int
    # Their data directories and Prometheus' configuration and rules: laid out by the deploy step, never at boot
    # (user-data that changed would replace the server).
    directories: tuple[HostDirectory, ...]
    files: tuple[ConfigFile, ...]

    @property
    def services(self) -> tuple[ServiceSpec, ...]:
        """In the order they start: the exporters, Alertmanager, then the Prometheus that scrapes and sends."""
        exporters = (self.node_exporter, *((self.postgres_exporter,) if self.postgres_exporter else ()))
        return (*exporters, self.alertmanager, self.prometheus)

    def alertmanager_config(self, routes: AlertRoutes) -> str:
        return alertmanager_config(routes, self.interval_s)


@dataclass(frozen=True)
class StackSpec:
    network: str
    traefik: ContainerSpec
    docker_api: ContainerSpec  # the only holder of the Docker socket (infra/spec/docker_api.py)
    model: ServiceSpec
    host_directories: tuple[HostDirectory, ...]
    app_script: str  # installed on the host as APP_COMMAND
    retrain_cron: str
    domain: str
    config_files: tuple[ConfigFile, ...] = ()  # Traefik's dynamic configuration, the Docker API proxy's
    postgres: ServiceSpec | None = None  # with workers: the shared store of models and logs, on the manager
    monitoring: MonitoringSpec | None = None
    # A project whose data needs credentials: its first version, trained before the model service starts.
    first_training: ServiceSpec | None = None

    @property
    def services(self) -> tuple[ServiceSpec, ...]:
        """In the order they start: the database before the replicas that need it, Alertmanager before the
        Prometheus that sends to it."""
        watch = self.monitoring.services if self.monitoring else ()
        return (*((self.postgres,) if self.postgres else ()), self.model, *watch)

    @property
    def secret_bases(self) -> tuple[str, ...]:
        """Every swarm secret the services (and the first training job) mount, by base name."""
        mounting = (*self.services, *((self.first_training,) if self.first_training else ()))
        return tuple(dict.fromkeys(item.secret for service in mounting for item in service.secrets))

    @property
    def volumes(self) -> tuple[str, ...]:
        """The named Docker volumes the containers mount (the deployment creates them)."""
        mounts = (*self.traefik.mounts, *self.docker_api.mounts, *self.model.mounts)
        return tuple(sorted({m.source for m in mounts if m.kind == "volume"}))
