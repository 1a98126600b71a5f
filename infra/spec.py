"""The one description of what runs on the VM, free of Pulumi types.

`build_stack` turns validated inputs into container specs (image, command, env, labels, mounts, ports,
healthcheck, restart policy) plus the host layout and the retrain cron entry. The Pulumi components map this to
resources, the local stack (`infra.local`) runs it on a local engine, and the cloud-init renderer prepares the host
for it: the three can only agree, because they read the same data.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

TRAEFIK_VERSION = "3.6.15"  # >= 3.6.1: older 3.x cannot talk to Docker 29 engines (traefik#12253)
LETSENCRYPT_PRODUCTION = "https://acme-v02.api.letsencrypt.org/directory"
LETSENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"

NETWORK = "mlapi"
TRAEFIK_CONTAINER = "mlapi-traefik"
MODEL_CONTAINER = "mlapi-model"
MODEL_PORT = 8000
MODEL_UID = 10001  # the image's non-root user (app/Dockerfile)
CERT_RESOLVER = "letsencrypt"
ROUTER = "mlapi"
DEFAULT_DATA_ROOT = "/srv/mlapi"
DEFAULT_RETRAIN_SCHEDULE = "0 * * * *"
RETRAIN_LOG = "/var/log/mlapi-retrain.log"
PRIVATE_PREFIX = "/admin"
ACME_CA_BUNDLE_PATH = "/etc/mlapi/acme-ca.pem"  # inside the Traefik container, only when acme_ca_bundle is set

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
    model_image: str = Field("mlapi-model:latest", description="image the model container runs")
    traefik_image: str = f"traefik:v{TRAEFIK_VERSION}"
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
    source: str  # a host path
    target: str
    read_only: bool = False


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
class ContainerSpec:
    name: str
    image: str
    command: tuple[str, ...]
    env: dict[str, str]
    labels: dict[str, str]
    mounts: tuple[Mount, ...]
    ports: tuple[PublishedPort, ...]
    aliases: tuple[str, ...]
    healthcheck: Healthcheck
    restart: str = "unless-stopped"


@dataclass(frozen=True)
class HostDirectory:
    path: str
    owner_uid: int
    mode: str


@dataclass(frozen=True)
class StackSpec:
    network: str
    traefik: ContainerSpec
    model: ContainerSpec
    host_directories: tuple[HostDirectory, ...]
    retrain_command: tuple[str, ...]
    retrain_cron: str
    domain: str
    containers: tuple[ContainerSpec, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "containers", (self.traefik, self.model))


def traefik_flags(inputs: StackInputs) -> tuple[str, ...]:
    """Traefik's static configuration: Docker labels opt-in, HTTP→HTTPS, one ACME resolver, no dashboard."""
    resolver = f"--certificatesresolvers.{CERT_RESOLVER}.acme"
    flags = [
        "--providers.docker=true",
        "--providers.docker.exposedbydefault=false",
        f"--providers.docker.network={NETWORK}",
        "--entrypoints.web.address=:80",
        "--entrypoints.web.http.redirections.entrypoint.to=websecure",
        "--entrypoints.web.http.redirections.entrypoint.scheme=https",
        "--entrypoints.web.http.redirections.entrypoint.permanent=true",
        "--entrypoints.websecure.address=:443",
        f"{resolver}.email={inputs.acme_email}",
        f"{resolver}.storage=/acme/acme.json",
        f"{resolver}.tlschallenge=true",
        f"{resolver}.caserver={inputs.ca_server}",
        "--ping=true",
        "--log.level=INFO",
        "--accesslog=true",
        "--global.checknewversion=false",
        "--global.sendanonymoususage=false",
    ]
    if inputs.acme_ca_bundle:
        flags.append(f"{resolver}.cacertificates={ACME_CA_BUNDLE_PATH}")
    return tuple(flags)


def model_labels(inputs: StackInputs) -> dict[str, str]:
    """Route `Host(domain)` on websecure with the resolver; never the private prefix; HSTS on every answer."""
    router = f"traefik.http.routers.{ROUTER}"
    headers = f"traefik.http.middlewares.{ROUTER}-headers.headers"
    return {
        "traefik.enable": "true",
        "traefik.docker.network": NETWORK,
        f"{router}.rule": f"Host(`{inputs.domain}`) && !PathPrefix(`{PRIVATE_PREFIX}`)",
        f"{router}.entrypoints": "websecure",
        f"{router}.tls": "true",
        f"{router}.tls.certresolver": CERT_RESOLVER,
        f"{router}.middlewares": f"{ROUTER}-headers",
        f"{headers}.stsseconds": "31536000",
        f"{headers}.stsincludesubdomains": "true",
        f"traefik.http.services.{ROUTER}.loadbalancer.server.port": str(MODEL_PORT),
    }


def build_stack(inputs: StackInputs) -> StackSpec:
    root = inputs.data_root.rstrip("/")
    retrain_command = ("docker", "exec", MODEL_CONTAINER, "python", "-m", "app", "retrain")
    traefik = ContainerSpec(
        name=TRAEFIK_CONTAINER,
        image=inputs.traefik_image,
        command=traefik_flags(inputs),
        env={},
        labels={},
        mounts=(
            Mount("/var/run/docker.sock", "/var/run/docker.sock", read_only=True),
            Mount(f"{root}/traefik", "/acme"),
            *((Mount(inputs.acme_ca_bundle, ACME_CA_BUNDLE_PATH, read_only=True),) if inputs.acme_ca_bundle else ()),
        ),
        ports=tuple(
            PublishedPort(ip, host_port, container_port)
            for container_port, host_port in ((80, inputs.http_port), (443, inputs.https_port))
            for ip in inputs.publish_ips
        ),
        aliases=inputs.traefik_aliases,
        healthcheck=Healthcheck(("CMD", "traefik", "healthcheck", "--ping"), start_period_s=10),
    )
    model = ContainerSpec(
        name=MODEL_CONTAINER,
        image=inputs.model_image,
        command=("python", "-m", "app", "serve"),
        env={"MLAPI_DATA_DIR": "/data", "MLAPI_PORT": str(MODEL_PORT)},
        labels=model_labels(inputs),
        mounts=(Mount(f"{root}/model", "/data"),),
        ports=(),  # reachable only through Traefik on the internal network
        aliases=("model",),
        healthcheck=Healthcheck(
            (
                "CMD",
                "python",
                "-c",
                f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{MODEL_PORT}/ready', timeout=4)",
            ),
        ),
    )
    return StackSpec(
        network=NETWORK,
        traefik=traefik,
        model=model,
        host_directories=(
            HostDirectory(f"{root}/model", MODEL_UID, "0750"),
            HostDirectory(f"{root}/traefik", 0, "0700"),
        ),
        retrain_command=retrain_command,
        retrain_cron=f"{inputs.retrain_schedule} root {' '.join(retrain_command)} >> {RETRAIN_LOG} 2>&1",
        domain=inputs.domain,
    )


def source_tag(app_dir: Path) -> str:
    """A tag that changes exactly when the build context changes, so a code change replaces the container."""
    digest = hashlib.sha256()
    for path in sorted(p for p in app_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        if path.suffix in {".pyc", ".whl"}:
            continue
        digest.update(path.relative_to(app_dir).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]
