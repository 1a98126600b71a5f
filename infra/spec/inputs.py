"""What decides the stack (StackInputs), validated once: the Pulumi config maps onto it, the local stack overrides a
documented few of its production defaults."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from infra.spec.acme import LETSENCRYPT_PRODUCTION, LETSENCRYPT_STAGING
from infra.spec.docker_api import DOCKER_API_IMAGE
from infra.spec.monitoring import (
    ALERTMANAGER_IMAGE,
    DEFAULT_LATENCY_OBJECTIVE_MS,
    DEFAULT_RETENTION,
    NODE_EXPORTER_IMAGE,
    POSTGRES_EXPORTER_IMAGE,
    PROMETHEUS_IMAGE,
    check_duration,
)
from infra.spec.postgres import POSTGRES_IMAGE

TRAEFIK_VERSION = "3.7.15"  # >= 3.7: retry on status codes with a buffered body (3.6.1: Docker 29, traefik#12253)
DEFAULT_DATA_ROOT = "/srv/mlapi"
DEFAULT_RETRAIN_SCHEDULE = "0 * * * *"
DEFAULT_MODEL_REPLICAS = 2
WORLD = ("0.0.0.0/0", "::/0")  # every address: the firewall rule for a public port

_DOMAIN = re.compile(r"^(?=.{1,253}$)(?!-)([a-z0-9-]{1,63}(?<!-)\.)+[a-z]{2,63}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_CRON_MACROS = {"@hourly", "@daily", "@weekly", "@monthly", "@yearly", "@annually", "@midnight"}


def ascii_digits(text: str) -> bool:
    """Digits cron, a shell and every parser downstream read alike: '٣'.isdigit() is True, and a schedule written
    with it would silently never run."""
    return text.isascii() and text.isdigit()


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
            if step and (not ascii_digits(step) or int(step) == 0):
                raise ValueError(f"{name} field {text!r}: step must be a positive number")
            if base == "*":
                continue
            bounds = base.split("-")
            if len(bounds) > 2 or not all(ascii_digits(b) for b in bounds):
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
    # The model project's data needs credentials (s3://): a swarm secret for the replicas, a first training job.
    data_credentials: bool = False
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
    prometheus_image: str = PROMETHEUS_IMAGE
    alertmanager_image: str = ALERTMANAGER_IMAGE
    node_exporter_image: str = NODE_EXPORTER_IMAGE
    postgres_exporter_image: str = POSTGRES_EXPORTER_IMAGE  # with workers only
    backups: bool = False  # a backup repository is configured: the backup alerts apply
    monitoring_retention: str = DEFAULT_RETENTION  # how long Prometheus keeps samples (a size bound applies too)
    latency_objective_ms: int = Field(DEFAULT_LATENCY_OBJECTIVE_MS, ge=10, le=60_000)  # p99 at the edge
    # How often Prometheus scrapes and evaluates, and how long Alertmanager waits to group alerts; the local stack's
    # tests shorten both, and every rule's `for` (alert_wait), so an alert reaches their webhook within seconds.
    monitoring_interval_s: int = Field(15, ge=1, le=300)
    alert_wait: str | None = None
    data_root: str = DEFAULT_DATA_ROOT
    # Local differences (see infra/local/stack.py): where ACME lives, which CA to trust, where ports bind.
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

    @field_validator("monitoring_retention")
    @classmethod
    def _retention(cls, value: str) -> str:
        return check_duration(value)

    @property
    def ca_server(self) -> str:
        if self.acme_ca_server:
            return self.acme_ca_server
        return LETSENCRYPT_STAGING if self.acme_staging else LETSENCRYPT_PRODUCTION
