"""The production stack on a local Docker engine: ``python -m infra.local {up,down,status}`` (``make local-up``).

It runs the same spec as `pulumi up` (infra/spec/stack.py → build_stack) on the same runtime: the engine in swarm mode,
the model as a replicated swarm service, Traefik as a container reading service labels. A second `up` after a code
change in app/ is a rolling, start-first update of the service, not a restart. The local differences, and only these
(tests/stack/test_stack.py checks that nothing else differs):

- ACME: Pebble (Let's Encrypt's test CA) at https://pebble:14000/dir instead of Let's Encrypt, and Traefik trusts
  Pebble's listener CA (one extra read-only mount plus the `acme.cacertificates` flag);
- domain: api.localtest; Traefik carries it as a network alias so Pebble's validation reaches it;
- host ports: 127.0.0.1:8080/8443 instead of every interface on 80/443;
- images: built here (infra/local/images.py) instead of pulled or built on the VM (the Docker API proxy: Debian's
  HAProxy instead of the official image, same configuration; Prometheus and Alertmanager: Debian's binaries);
- alerts: to MLAPI_LOCAL_ALERT_WEBHOOK_URL if set (nowhere otherwise); the tests shorten the monitoring's timings;
- data root: .local/data instead of /srv/mlapi on the Hetzner volume; the tokens in .local/state;
- per-client limits at the edge: high, since every local client (and every load test) comes from one address.

Swarm mode: if the engine is not in it, `up` turns it on (single-node manager on 127.0.0.1) and says so;
`down --delete-data` (`make local-destroy`) turns it off again only if `up` turned it on.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import docker
from docker.types import Mount

from infra.config.project import data_needs_credentials
from infra.host.setup import layout_script
from infra.local import images
from infra.local.engine import deploy_stack, ensure_network, ensure_swarm, remove_service, remove_unused_secrets
from infra.local.pebble import PEBBLE_CONTAINER, PEBBLE_DIRECTORY, fetch_pebble_root, pebble_files, run_pebble
from infra.ops.smoke import wait_healthy
from infra.spec.data_access import DATA_CREDENTIALS_SECRET, FIRST_TRAINING_JOB, credentials_file_text
from infra.spec.docker_api import DOCKER_API_CONTAINER, DOCKER_API_VOLUME
from infra.spec.inputs import StackInputs
from infra.spec.monitoring import ALERTMANAGER_CONFIG_SECRET, ALERTMANAGER_SERVICE, PROMETHEUS_SERVICE, AlertRoutes
from infra.spec.stack import ADMIN_SECRET, INGEST_SECRET, MODEL_SERVICE, NETWORK, TRAEFIK_CONTAINER, build_stack
from infra.spec.traefik import WEB_PORT, WEBSECURE_PORT, acme_storage
from infra.spec.types import StackSpec

PROJECT_DIR = Path(__file__).resolve().parents[2]
LOCAL_DIR = PROJECT_DIR / ".local"
LOCAL_RATE_LIMIT = 5000  # per second; production: rateLimitPerSecond (100)
LOCAL_IN_FLIGHT = 1000
SWARM_MARKER = "swarm-enabled-by-mlapi"  # in the state dir: `local-destroy` leaves swarm mode only if we joined it


class LocalStackError(RuntimeError):
    """The local stack cannot start; the message says what to do."""


@dataclass(frozen=True)
class LocalOptions:
    domain: str = "api.localtest"
    acme_email: str = "ops@api.localtest"  # Pebble writes nowhere; example.com is refused as a placeholder
    http_port: int = 8080
    https_port: int = 8443
    data_root: Path = LOCAL_DIR / "data"
    state_dir: Path = LOCAL_DIR / "state"
    backup_dir: Path = LOCAL_DIR / "backup"  # the restic repository and its password: `local-destroy` keeps them
    model_replicas: int = 2
    model_project: Path | None = None  # `make local-up MODEL=<dir>`: serve this model project
    alert_webhook_url: str | None = None  # MLAPI_LOCAL_ALERT_WEBHOOK_URL: where the local Alertmanager sends alerts
    # The tests' short monitoring timings (StackInputs.monitoring_interval_s, alert_wait); None: production's.
    monitoring_interval_s: int | None = None
    alert_wait: str | None = None

    @classmethod
    def from_environment(cls) -> LocalOptions:
        """As `make local-*` and `mlapi --local` read them: ports and replicas from MLAPI_LOCAL_HTTP_PORT,
        MLAPI_LOCAL_HTTPS_PORT and MLAPI_LOCAL_REPLICAS; MLAPI_LOCAL_DIR moves data, state and backups together."""
        ports = {
            "http_port": int(os.environ.get("MLAPI_LOCAL_HTTP_PORT", "8080")),
            "https_port": int(os.environ.get("MLAPI_LOCAL_HTTPS_PORT", "8443")),
        }
        replicas = int(os.environ.get("MLAPI_LOCAL_REPLICAS", "2"))
        root = os.environ.get("MLAPI_LOCAL_DIR")
        options = cls.isolated(Path(root), **ports) if root else cls(**ports)
        webhook = os.environ.get("MLAPI_LOCAL_ALERT_WEBHOOK_URL") or None
        return replace(options, model_replicas=replicas, alert_webhook_url=webhook)

    @classmethod
    def isolated(cls, root: Path, http_port: int, https_port: int) -> LocalOptions:
        """A stack with its own data, state and backup directories under ``root`` (tests, benchmarks)."""
        return cls(
            http_port=http_port,
            https_port=https_port,
            data_root=root / "data",
            state_dir=root / "state",
            backup_dir=root / "backup",
        )


@dataclass
class LocalStack:
    spec: StackSpec
    inputs: StackInputs
    options: LocalOptions
    ca_root: Path
    url: str
    timings: dict[str, float] = field(default_factory=dict)
    rollout: str = ""

    @property
    def curl(self) -> str:
        o = self.options
        return (
            f"curl --cacert {shlex.quote(str(self.ca_root))} --resolve {o.domain}:{o.https_port}:127.0.0.1 "
            f"{self.url}/health"
        )


def engine() -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=300)
        client.ping()
    except docker.errors.DockerException as exc:
        raise LocalStackError(
            f"no Docker engine answers ({exc}). Start one (e.g. `dockerd &` as root, or your Docker Desktop) "
            "and try again."
        ) from None
    return client


def local_inputs(options: LocalOptions, built: dict[str, str], ca_bundle: Path) -> StackInputs:
    """Production inputs with exactly the documented local differences applied."""
    production = StackInputs(domain=options.domain, acme_email=options.acme_email)
    return production.model_copy(
        update={
            "acme_ca_server": PEBBLE_DIRECTORY,
            "acme_ca_bundle": str(ca_bundle),
            "publish_ips": ("127.0.0.1",),
            "http_port": options.http_port,
            "https_port": options.https_port,
            "traefik_aliases": (production.domain,),
            "model_image": built["model"],
            "traefik_image": built["traefik"],
            "docker_api_image": built["docker_api"],
            "prometheus_image": built["monitoring"],
            "alertmanager_image": built["monitoring"],
            "node_exporter_image": built["monitoring"],
            "postgres_exporter_image": built["monitoring"],
            "data_root": str(options.data_root),
            "model_replicas": options.model_replicas,
            # Every local client (and every load test) reaches Traefik from one address, the bridge's gateway.
            "rate_limit_per_s": LOCAL_RATE_LIMIT,
            "rate_limit_burst": LOCAL_RATE_LIMIT,
            "in_flight_per_client": LOCAL_IN_FLIGHT,
            **({"monitoring_interval_s": options.monitoring_interval_s} if options.monitoring_interval_s else {}),
            **({"alert_wait": options.alert_wait} if options.alert_wait else {}),
        }
    )


def host_data_credentials(project: Path) -> str:
    """The credentials file the stack's replicas fetch s3:// data with: this machine's AWS credentials, as boto3 finds
    them (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile), never the project's files."""
    import boto3  # the dev venv's (requirements-dev.lock)

    found = boto3.session.Session().get_credentials()
    if found is None:
        raise LocalStackError(
            f"MODEL={project}: model.data is an s3:// object and no AWS credentials are set here: export "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for a user that may read it"
        )
    frozen = found.get_frozen_credentials()
    return credentials_file_text(frozen.access_key, frozen.secret_key, frozen.token)


def stack_tokens(state_dir: Path) -> dict[str, str]:
    """The local stack's bearer tokens, made once into the state dir (on the VM they come from the program as swarm
    secrets): admin-token for /admin, ingest-token for POST /observations."""
    tokens = {}
    for base, file_name in ((ADMIN_SECRET, "admin-token"), (INGEST_SECRET, "ingest-token")):
        path = state_dir / file_name
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(32))
        tokens[base] = path.read_text().strip()
    return tokens


def prepare_host(client: docker.DockerClient, spec: StackSpec, data_root: Path, base_image: str) -> None:
    """The deploy step's directory layout itself, run as root in a throwaway container (no sudo needed)."""
    data_root.mkdir(parents=True, exist_ok=True)
    client.containers.run(
        base_image,
        ["sh", "-c", "set -eu\n" + layout_script(spec)],
        remove=True,
        mounts=[Mount(target=str(data_root), source=str(data_root), type="bind")],
    )


def at_most_every(seconds: float, tell: Callable[[str], None]) -> Callable[[str], None]:
    """``tell``, but at most one line per ``seconds`` (a check retried 4 times a second would flood the screen)."""
    last = -seconds

    def told(line: str) -> None:
        nonlocal last
        if time.monotonic() - last >= seconds:
            last = time.monotonic()
            tell(line)

    return told


def _remove_pre_swarm_containers(client: docker.DockerClient) -> None:
    """The stack before swarm mode ran the model as a plain container named like the service: remove it."""
    with contextlib.suppress(docker.errors.NotFound):
        legacy = client.containers.get(MODEL_SERVICE)
        if "com.docker.swarm.task" not in legacy.labels:
            legacy.remove(force=True)


def up(options: LocalOptions | None = None, *, quiet: bool = False) -> LocalStack:
    options = options or LocalOptions()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    client = engine()
    started = time.monotonic()
    say("building images (cached after the first run)…")
    data_credentials = None
    if options.model_project is not None:
        images.check_project(options.model_project)  # before anything is built or stopped
        if data_needs_credentials(options.model_project):
            data_credentials = host_data_credentials(options.model_project)
    built = images.build_stack_images(client, progress=say)
    if options.model_project is not None:
        say(f"image model-project: building from {options.model_project}…")
        built["model"] = images.build_project_image(client, built["model"], built["base"], options.model_project)
    images_ready = time.monotonic()
    say(f"images ready in {images_ready - started:.0f} s; deploying the stack…")

    options.state_dir.mkdir(parents=True, exist_ok=True)
    if ensure_swarm(client):
        (options.state_dir / SWARM_MARKER).touch()
        say("note: this Docker engine was not in swarm mode; it is now a single-node swarm manager on 127.0.0.1.")
        say("      `make local-destroy` leaves swarm mode again.")
    _remove_pre_swarm_containers(client)
    # Pebble reaches Traefik on the overlay by its alias: the ports Traefik listens on inside its container.
    pebble_dir = pebble_files(options.state_dir, (WEB_PORT, WEBSECURE_PORT))
    inputs = local_inputs(options, built, pebble_dir / "ca.pem").model_copy(
        update={"data_credentials": data_credentials is not None}
    )
    spec = build_stack(inputs)
    ensure_network(client, spec.network)
    run_pebble(client, built["pebble"], pebble_dir, spec.network)
    ca_root = fetch_pebble_root(client, pebble_dir, options.state_dir / "pebble-root.pem")
    # The root the certificates in the store chain to, recorded after the last verified start.
    store_root = options.state_dir / "acme-store-root.pem"
    if not store_root.exists() or store_root.read_bytes() != ca_root.read_bytes():
        # Pebble makes a new root at every start (after `local-down`, a reboot): certificates Traefik kept chain
        # to a root that no longer exists. Drop them and the Traefik serving them; it obtains a new certificate.
        with contextlib.suppress(docker.errors.NotFound):
            client.containers.get(TRAEFIK_CONTAINER).remove(force=True)
        remove_as_root(client, options.data_root, "traefik/" + acme_storage(inputs.ca_server).rsplit("/", 1)[1])

    url = f"https://{spec.domain}:{options.https_port}"
    prepare_host(client, spec, options.data_root, built["base"])
    tokens = stack_tokens(options.state_dir)
    if spec.monitoring is not None:
        tokens[ALERTMANAGER_CONFIG_SECRET] = spec.monitoring.alertmanager_config(AlertRoutes(options.alert_webhook_url))
    if data_credentials is not None:
        tokens[DATA_CREDENTIALS_SECRET] = data_credentials
        say(f"{FIRST_TRAINING_JOB}: the project's s3:// data is fetched with your AWS credentials (a swarm secret)")
    say(f"deploying: {', '.join(service.name for service in spec.services)} (rolling, start-first)…")
    rollout = deploy_stack(client, spec, tokens)  # what the VM gets, over ssh:// there
    say(f"{MODEL_SERVICE}: {rollout.action} in {rollout.seconds} s; waiting for {url}/health over verified HTTPS…")

    ok, message = wait_healthy(
        f"{url}/health",
        attempts=240,
        delay=0.25,
        cacert=str(ca_root),
        connect_to="127.0.0.1",
        timeout=5,
        progress=at_most_every(10, say),
    )
    if not ok:
        logs = (
            f"`docker logs {TRAEFIK_CONTAINER}`, `docker logs {PEBBLE_CONTAINER}`, "
            f"`docker service ps --no-trunc {MODEL_SERVICE}`"
        )
        raise LocalStackError(f"{message}\n(locally: {logs})")
    store_root.write_bytes(ca_root.read_bytes())
    finished = time.monotonic()
    stack = LocalStack(
        spec,
        inputs,
        options,
        ca_root,
        url,
        {
            "images_s": round(images_ready - started, 2),
            "stack_s": round(finished - images_ready, 2),
            "total_s": round(finished - started, 2),
        },
        rollout=f"{rollout.action} in {rollout.seconds} s",
    )
    say(f"\nmlapi is up at {url} (Traefik with a certificate from Pebble, the local Let's Encrypt stand-in)")
    say(f"model service {MODEL_SERVICE}: {spec.model.replicas} replicas, {stack.rollout}")
    say(f"CA root saved at {ca_root}")
    say(f"try:  {stack.curl}")
    say('      add /docs, /model, or POST /predict with {"features": {...}}')
    say(
        f"timings: images {stack.timings['images_s']} s, stack to first verified HTTPS 200 "
        f"{stack.timings['stack_s']} s, total {stack.timings['total_s']} s"
    )
    return stack


def down(options: LocalOptions | None = None, *, delete_data: bool = False, quiet: bool = False) -> None:
    options = options or LocalOptions()
    client = engine()
    if client.info()["Swarm"]["LocalNodeState"] == "active":
        for service in (PROMETHEUS_SERVICE, ALERTMANAGER_SERVICE, MODEL_SERVICE):
            remove_service(client, service)  # waits for the tasks' graceful shutdown
    _remove_pre_swarm_containers(client)
    for name in (TRAEFIK_CONTAINER, DOCKER_API_CONTAINER, PEBBLE_CONTAINER):
        with contextlib.suppress(docker.errors.NotFound):
            client.containers.get(name).remove(force=True)
    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
        client.networks.get(NETWORK).remove()
    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
        client.volumes.get(DOCKER_API_VOLUME).remove()  # holds only the proxy's socket
    with contextlib.suppress(docker.errors.APIError):
        for base in (ADMIN_SECRET, INGEST_SECRET, ALERTMANAGER_CONFIG_SECRET):
            remove_unused_secrets(client, base, keep="")
    left_swarm = False
    if delete_data:
        delete_data_root(client, options.data_root)
        if (options.state_dir / SWARM_MARKER).exists():
            client.swarm.leave(force=True)
            left_swarm = True
        shutil.rmtree(options.state_dir, ignore_errors=True)
    if not quiet:
        print(
            "local stack stopped" + (" and its data deleted" if delete_data else f"; data kept in {options.data_root}")
        )
        if left_swarm:
            print("this engine left swarm mode again (local-up had turned it on)")


def remove_as_root(client: docker.DockerClient, directory: Path, relative: str) -> None:
    """rm -rf directory/relative, as root in a throwaway container: the files belong to the services' users."""
    if not directory.exists():
        return
    client.containers.run(
        images.build_base(client),
        ["rm", "-rf", f"/target/{relative}"],
        remove=True,
        mounts=[Mount(target="/target", source=str(directory), type="bind")],
    )


def delete_data_root(client: docker.DockerClient, data_root: Path) -> None:
    """Remove the data root itself, whatever its name (and nothing beside it)."""
    if data_root.exists():
        remove_as_root(client, data_root.parent, data_root.name)
