"""Operator configuration: read from Pulumi config, validated, with errors that name the key and the fix."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from infra.backup import BackupSettings
from infra.spec import DEFAULT_MODEL_REPLICAS, DEFAULT_RETRAIN_SCHEDULE, StackInputs, check_cron

HETZNER_LOCATIONS = ("fsn1", "nbg1", "hel1", "ash", "hil", "sin")
SSH_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa")
WORLD = ("0.0.0.0/0", "::/0")
ACME_CHALLENGES = ("tls", "dns")
MAX_WORKERS = 10


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the key and how to set it."""


class DeployConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    domain: str
    acme_email: str
    cloudflare_zone_id: str
    ssh_public_key: str
    ssh_allowed_cidrs: tuple[str, ...]  # required: the operator says who may reach SSH
    ssh_private_key_path: str | None = None
    server_type: str = "cx23"
    location: str = "nbg1"
    image: str = "ubuntu-24.04"
    acme_staging: bool = False
    model_image: str | None = None
    retrain_schedule: str = DEFAULT_RETRAIN_SCHEDULE
    model_replicas: int = DEFAULT_MODEL_REPLICAS
    rate_limit_per_s: int = 100
    rate_limit_burst: int = 200
    in_flight_per_client: int = 32
    volume_size: int = 10
    keep_data_volume: bool = True
    data_volume_id: int | None = None
    dns_proxied: bool = False
    public_docs: bool = True
    hsts_preload: bool = False
    workers: int = 0  # worker VMs joined to the manager's swarm over a private network
    worker_server_type: str | None = None  # None: the manager's serverType
    acme_challenge: str = "tls"  # tls (TLS-ALPN on 443) | dns (DNS-01 through Cloudflare, a scoped token)
    load_balancer: bool = False  # a Hetzner Load Balancer in front, TCP passthrough with the PROXY protocol
    load_balancer_type: str = "lb11"
    server_backups: bool = False  # Hetzner's own; they do not include the data volume (restic covers that)
    backup: BackupSettings | None = None
    backup_password: SecretStr | None = None
    backup_environment: dict[str, SecretStr] = {}
    backup_ssh_key: SecretStr | None = None
    backup_ssh_known_hosts: str | None = None


# key: (required, example shown in the error, description)
KEYS: dict[str, tuple[bool, str, str]] = {
    "domain": (True, "api.example.com", "fully-qualified domain name to serve"),
    "acmeEmail": (True, "ops@example.com", "Let's Encrypt account email"),
    "cloudflareZoneId": (True, "0123456789abcdef0123456789abcdef", "Cloudflare zone ID (32 hex) holding domain"),
    "sshPublicKey": (True, '"$(cat ~/.ssh/id_ed25519.pub)"', "OpenSSH public key (ed25519, ecdsa or rsa)"),
    "sshAllowedCidrs": (
        True,
        "'[\"203.0.113.7/32\"]'",
        'CIDRs allowed on port 22 (JSON list or comma list); \'["0.0.0.0/0", "::/0"]\' opens it to everyone',
    ),
    "sshPrivateKeyPath": (False, "~/.ssh/id_ed25519", "private key file for the deploy (default: ssh-agent)"),
    "serverType": (False, "cx23", "Hetzner server type"),
    "location": (False, "nbg1", f"Hetzner location, one of {', '.join(HETZNER_LOCATIONS)}"),
    "image": (False, "ubuntu-24.04", "Hetzner OS image"),
    "acmeStaging": (False, "true", "use Let's Encrypt's staging CA (true/false)"),
    "modelImage": (False, "ghcr.io/acme/model:1.2", "registry image instead of building app/ on the host"),
    "retrainSchedule": (False, '"0 3 * * *"', "cron expression for scheduled retraining"),
    "modelReplicas": (False, "2", "replicas of the model service across all nodes (1-64)"),
    "workers": (False, "2", "worker VMs joining the swarm over a private network (0-10; README: Growing past one VM)"),
    "workerServerType": (False, "cx33", "Hetzner server type of the workers (default: serverType)"),
    "acmeChallenge": (
        False,
        "dns",
        "how Let's Encrypt validates the domain: tls (TLS-ALPN on port 443) or dns (DNS-01 with a scoped Cloudflare "
        "token the program creates)",
    ),
    "loadBalancer": (False, "true", "a Hetzner Load Balancer in front of Traefik, PROXY protocol (true/false)"),
    "loadBalancerType": (False, "lb11", "Hetzner load balancer type (lb11, lb21, lb31)"),
    "rateLimitPerSecond": (False, "100", "requests per second per client address at the edge, 429 beyond (1-100000)"),
    "rateLimitBurst": (False, "200", "requests a client may burst above the rate (1-100000)"),
    "inFlightPerClient": (False, "32", "concurrent requests per client address at the edge (1-10000)"),
    "volumeSize": (False, "10", "data volume size in GB (10-10240)"),
    "keepDataVolume": (False, "true", "keep the data volume on `pulumi destroy` (true/false)"),
    "dataVolumeId": (False, "12345678", "attach this existing (kept) volume instead of creating one"),
    "dnsProxied": (False, "true", "proxy the DNS record through Cloudflare (only with acmeChallenge=dns)"),
    "publicDocs": (False, "false", "serve /docs, /redoc and /openapi.json to the internet (true/false)"),
    "hstsPreload": (
        False,
        "true",
        "ask browsers' HSTS preload lists to include the domain (true/false; hard to undo: see the README)",
    ),
    "serverBackups": (
        False,
        "true",
        "Hetzner's daily server backups (true/false; +20 % of the server price, volumes not included)",
    ),
    "backupRepository": (
        False,
        "sftp:u123456@u123456.your-storagebox.de:/mlapi",
        "restic repository for backups (sftp:, s3:, rest:, b2:, azure:, gs:, swift:, rclone: or an absolute path)",
    ),
    "backupPassword": (False, "--secret <long random password>", "restic repository password (a secret)"),
    "backupEnvironment": (
        False,
        """--secret '{"AWS_ACCESS_KEY_ID": "…", "AWS_SECRET_ACCESS_KEY": "…"}'""",
        "the repository's credentials as environment variables, a JSON object (a secret)",
    ),
    "backupSshKey": (False, '--secret "$(cat backup_ed25519)"', "private key for an sftp: repository (a secret)"),
    "backupSshKnownHosts": (False, '"$(ssh-keyscan -p 23 u123456.your-storagebox.de)"', "the sftp host's keys"),
    "backupSchedule": (False, '"30 2 * * *"', "cron expression for backups"),
    "backupKeep": (False, "daily=7,weekly=4,monthly=6", "snapshots kept by restic forget"),
}

RESTIC_SCHEMES = ("sftp:", "s3:", "rest:", "b2:", "azure:", "gs:", "swift:", "rclone:")
DEFAULT_BACKUP_SCHEDULE = "30 2 * * *"


def _error(key: str, problem: str) -> ConfigError:
    _, example, description = KEYS[key]
    return ConfigError(
        f"configuration '{key}' ({description}): {problem}. Set it with: pulumi config set {key} {example}"
    )


def _bool(key: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise _error(key, f"{raw!r} is not true or false")


def _ssh_public_key(raw: str) -> str:
    key = raw.strip()
    parts = key.split()
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        raise _error("sshPublicKey", f"must start with one of {', '.join(SSH_KEY_TYPES)} followed by the key data")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise _error("sshPublicKey", "the key data is not valid base64") from None
    length = int.from_bytes(blob[:4], "big") if len(blob) >= 4 else -1
    if blob[4 : 4 + length].decode(errors="replace") != parts[0]:
        raise _error("sshPublicKey", f"the key data does not encode a {parts[0]} key (truncated or mismatched?)")
    if len(parts) > 2 and ("\n" in key or len(key) > 16384):
        raise _error("sshPublicKey", "give exactly one key on one line")
    return key


def _cidrs(raw: str) -> tuple[str, ...]:
    text = raw.strip()
    try:
        items = json.loads(text) if text.startswith("[") else [part for part in text.split(",")]
    except json.JSONDecodeError as exc:
        raise _error("sshAllowedCidrs", f"not a JSON list ({exc.msg})") from None
    if not isinstance(items, list) or not items or not all(isinstance(item, str) for item in items):
        raise _error("sshAllowedCidrs", "needs at least one CIDR string")
    networks = []
    for item in items:
        try:
            networks.append(str(ipaddress.ip_network(item.strip(), strict=True)))
        except ValueError as exc:
            raise _error("sshAllowedCidrs", f"{item.strip()!r} is not a CIDR ({exc})") from None
    return tuple(networks)


def _sftp_target(repository: str) -> tuple[str, int | None]:
    """(host, port) of restic's sftp:user@host:/path or sftp://user@host:port//path."""
    rest = repository.removeprefix("sftp:")
    if rest.startswith("//"):
        authority = rest[2:].split("/", 1)[0]
        host, _, port = authority.rpartition("@")[2].partition(":")
        return host, int(port) if port.isdigit() else None
    authority = rest.split(":", 1)[0]
    return authority.rpartition("@")[2], None


def _backup(raw: dict[str, str | None]) -> dict[str, object]:
    repository = (raw["backupRepository"] or "").strip()
    if not repository:
        return {}
    if not (repository.startswith(RESTIC_SCHEMES) or repository.startswith("/")):
        raise _error("backupRepository", f"{repository!r} is not a restic repository URL")
    if not (raw["backupPassword"] or "").strip():
        raise _error("backupPassword", "is required when backupRepository is set")
    values: dict[str, object] = {"backup_password": SecretStr(raw["backupPassword"].strip())}
    environment: dict[str, SecretStr] = {}
    if raw["backupEnvironment"]:
        try:
            parsed = json.loads(raw["backupEnvironment"])
        except json.JSONDecodeError as exc:
            raise _error("backupEnvironment", f"not a JSON object ({exc.msg})") from None
        if not isinstance(parsed, dict) or not all(
            isinstance(k, str) and re.fullmatch(r"[A-Z_][A-Z0-9_]*", k) and isinstance(v, str)
            for k, v in parsed.items()
        ):
            raise _error("backupEnvironment", "must map environment variable names (A-Z, 0-9, _) to strings")
        environment = {key: SecretStr(value) for key, value in parsed.items()}
    values["backup_environment"] = environment
    sftp_host, sftp_port = _sftp_target(repository) if repository.startswith("sftp:") else (None, None)
    if sftp_host is not None and not sftp_host:
        raise _error("backupRepository", f"{repository!r} names no host (sftp:user@host:/path)")
    if raw["backupSshKey"]:
        if "PRIVATE KEY-----" not in raw["backupSshKey"]:
            raise _error("backupSshKey", "is not an OpenSSH private key (-----BEGIN OPENSSH PRIVATE KEY-----)")
        values["backup_ssh_key"] = SecretStr(raw["backupSshKey"])
    if raw["backupSshKnownHosts"]:
        values["backup_ssh_known_hosts"] = raw["backupSshKnownHosts"].strip()
    schedule = DEFAULT_BACKUP_SCHEDULE
    if raw["backupSchedule"]:
        try:
            schedule = check_cron(raw["backupSchedule"])
        except ValueError as exc:
            raise _error("backupSchedule", str(exc)) from None
    keep = {"daily": 7, "weekly": 4, "monthly": 6}
    if raw["backupKeep"]:
        for part in raw["backupKeep"].split(","):
            name, _, number = part.strip().partition("=")
            if name not in keep or not number.isdigit() or int(number) > 1000:
                raise _error("backupKeep", f"{part.strip()!r}: use daily=N, weekly=N, monthly=N (N from 0 to 1000)")
            keep[name] = int(number)
    values["backup"] = BackupSettings(
        repository,
        schedule,
        keep["daily"],
        keep["weekly"],
        keep["monthly"],
        sftp_host=sftp_host,
        sftp_port=sftp_port,
    )
    return values


def load_config(get: Callable[[str], str | None]) -> DeployConfig:
    """Build the deploy configuration from a ``get(key) -> str | None`` (``pulumi.Config().get``)."""
    raw = {key: get(key) for key in KEYS}
    for key, (required, _, _) in KEYS.items():
        if required and (raw[key] is None or not str(raw[key]).strip()):
            raise _error(key, "is required and not set")
    values: dict[str, object] = {
        "domain": raw["domain"],
        "acme_email": raw["acmeEmail"],
        "ssh_public_key": _ssh_public_key(raw["sshPublicKey"]),
    }
    zone = raw["cloudflareZoneId"].strip()
    if not re.fullmatch(r"[0-9a-f]{32}", zone):
        raise _error("cloudflareZoneId", f"{zone!r} is not a 32-character hex zone ID (dashboard → Overview)")
    values["cloudflare_zone_id"] = zone
    values["ssh_allowed_cidrs"] = _cidrs(raw["sshAllowedCidrs"])
    if raw["sshPrivateKeyPath"]:
        # Kept as written (e.g. ~/.ssh/id_ed25519): ssh expands it, and no machine's home path lands in a resource.
        key_path = raw["sshPrivateKeyPath"].strip()
        expanded = Path(key_path).expanduser()
        if not expanded.is_file() or not os.access(expanded, os.R_OK):
            raise _error("sshPrivateKeyPath", f"{key_path} is not a readable file on this machine")
        values["ssh_private_key_path"] = key_path
    for key, field in (("serverType", "server_type"), ("workerServerType", "worker_server_type")):
        if raw[key]:
            if not re.fullmatch(r"[a-z]{2,4}\d{2,3}[a-z]*", raw[key].strip()):
                raise _error(key, f"{raw[key]!r} does not look like a Hetzner type (cx23, cax11, …)")
            values[field] = raw[key].strip()
    if raw["acmeChallenge"]:
        challenge = raw["acmeChallenge"].strip().lower()
        if challenge not in ACME_CHALLENGES:
            raise _error("acmeChallenge", f"{raw['acmeChallenge']!r} is not one of {', '.join(ACME_CHALLENGES)}")
        values["acme_challenge"] = challenge
    if raw["loadBalancerType"]:
        if not re.fullmatch(r"lb\d{2}", raw["loadBalancerType"].strip()):
            raise _error("loadBalancerType", f"{raw['loadBalancerType']!r} is not a Hetzner load balancer type")
        values["load_balancer_type"] = raw["loadBalancerType"].strip()
    if raw["location"]:
        if raw["location"].strip() not in HETZNER_LOCATIONS:
            raise _error("location", f"{raw['location']!r} is not a Hetzner location")
        values["location"] = raw["location"].strip()
    if raw["image"]:
        values["image"] = raw["image"].strip()
    for key, field in (
        ("acmeStaging", "acme_staging"),
        ("keepDataVolume", "keep_data_volume"),
        ("dnsProxied", "dns_proxied"),
        ("serverBackups", "server_backups"),
        ("publicDocs", "public_docs"),
        ("hstsPreload", "hsts_preload"),
        ("loadBalancer", "load_balancer"),
    ):
        if raw[key]:
            values[field] = _bool(key, raw[key])
    if raw["modelImage"]:
        image = raw["modelImage"].strip()
        if not re.fullmatch(r"[a-z0-9][a-z0-9._/:@-]*", image):
            raise _error("modelImage", f"{image!r} is not an image reference")
        values["model_image"] = image
    if raw["retrainSchedule"]:
        try:
            values["retrain_schedule"] = check_cron(raw["retrainSchedule"])
        except ValueError as exc:
            raise _error("retrainSchedule", str(exc)) from None
    for key, field, low, high in (
        ("volumeSize", "volume_size", 10, 10240),
        ("dataVolumeId", "data_volume_id", 1, None),
        ("modelReplicas", "model_replicas", 1, 64),
        ("workers", "workers", 0, MAX_WORKERS),
        ("rateLimitPerSecond", "rate_limit_per_s", 1, 100_000),
        ("rateLimitBurst", "rate_limit_burst", 1, 100_000),
        ("inFlightPerClient", "in_flight_per_client", 1, 10_000),
    ):
        if raw[key]:
            text = raw[key].strip()
            if not text.isdigit() or int(text) < low or (high is not None and int(text) > high):
                allowed = f"{low}-{high}" if high else f">= {low}"
                raise _error(key, f"{text!r} is not a whole number in {allowed}")
            values[field] = int(text)
    # The stack-level fields are validated by the same model the VM spec uses, so both reject the same input.
    try:
        StackInputs(domain=values["domain"], acme_email=values["acme_email"])
    except ValidationError as exc:
        first = exc.errors()[0]
        key = {"domain": "domain", "acme_email": "acmeEmail"}[first["loc"][0]]
        raise _error(key, first["msg"].removeprefix("Value error, ")) from None
    values["domain"] = StackInputs(domain=values["domain"], acme_email=values["acme_email"]).domain
    values.update(_backup(raw))
    if values.get("workers") and not values.get("model_image"):
        raise _error(
            "modelImage",
            "is required with workers > 0: every node pulls the model image from a registry (an image built on the "
            "manager exists only there)",
        )
    if values.get("dns_proxied") and values.get("acme_challenge", "tls") != "dns":
        # Behind Cloudflare's proxy, Let's Encrypt's TLS-ALPN (and HTTP) validation reaches Cloudflare, not Traefik:
        # the first certificate may be issued before the proxy is on, but every renewal fails, silently.
        raise _error(
            "dnsProxied",
            "true is refused with acmeChallenge=tls: the certificate is validated over a direct connection to the "
            "server (TLS-ALPN), which Cloudflare's proxy intercepts, so renewals would fail silently. Use "
            "`pulumi config set acmeChallenge dns` first (DNS-01 works behind the proxy)",
        )
    return DeployConfig(**values)
