"""Operator configuration: one table, one row per Pulumi config key. The row says what the key means, how it is
parsed and checked, where it lands (a field of DeployConfig, built from the table) and the example the error and the
docs show (docs/configuration.md is generated from it: `python -m infra.config`). Adding a key is one row plus its
use. Every error names the key, what is wrong and the command that sets it.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError, create_model

from infra.spec.backup import BackupSettings
from infra.spec.data_access import credentials_file_text
from infra.spec.inputs import DEFAULT_MODEL_REPLICAS, DEFAULT_RETRAIN_SCHEDULE, StackInputs, ascii_digits, check_cron
from infra.spec.monitoring import (
    DEFAULT_LATENCY_OBJECTIVE_MS,
    DEFAULT_RETENTION,
    AlertRoutes,
    check_duration,
    email_route,
)

HETZNER_LOCATIONS = ("fsn1", "nbg1", "hel1", "ash", "hil", "sin")
SSH_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa")
ACME_CHALLENGES = ("tls", "dns")
MAX_WORKERS = 10
RESTIC_SCHEMES = ("sftp:", "s3:", "rest:", "b2:", "azure:", "gs:", "swift:", "rclone:")
DEFAULT_BACKUP_SCHEDULE = "30 2 * * *"
DEFAULT_BACKUP_KEEP = {"daily": 7, "weekly": 4, "monthly": 6}

# The values Pulumi.dev.yaml shows: documentation values that reach nothing. A stack that kept one would create a
# server nobody can reach (or a record in someone else's zone), so each is refused, naming the key.
EXAMPLE_ZONE_ID = "0123456789abcdef0123456789abcdef"
EXAMPLE_SSH_KEY_DATA = "AAAAC3NzaC1lZDI1NTE5AAAAIDLpmSenSMqSDvSFdAqQgtlaOqlopDyCgvc7ldJdpEPP"
EXAMPLE_DOMAINS = ("example.com", "example.org", "example.net")
DOCUMENTATION_NETWORKS = tuple(
    ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)

# What restic and its backends read from the environment (restic's docs, "Environment Variables"; rclone's RCLONE_*
# for the rclone: backend). Anything else (PATH, LD_PRELOAD, RESTIC_PASSWORD_COMMAND, …) would run as root.
BACKUP_ENVIRONMENT = re.compile(
    r"(AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN|DEFAULT_REGION|PROFILE|SHARED_CREDENTIALS_FILE)"
    r"|RESTIC_(COMPRESSION|PACK_SIZE|CACHE_DIR|READ_CONCURRENCY)"
    r"|B2_(ACCOUNT_ID|ACCOUNT_KEY)"
    r"|AZURE_(ACCOUNT_NAME|ACCOUNT_KEY|ACCOUNT_SAS|ENDPOINT_SUFFIX)"
    r"|GOOGLE_(PROJECT_ID|APPLICATION_CREDENTIALS|ACCESS_TOKEN)"
    r"|OS_[A-Z_]+|ST_(AUTH|USER|KEY)|RCLONE_[A-Z0-9_]+)"
)
BACKUP_ENVIRONMENT_ALLOWED = (
    "AWS_ACCESS_KEY_ID/SECRET_ACCESS_KEY/SESSION_TOKEN/DEFAULT_REGION, B2_ACCOUNT_ID/KEY, AZURE_ACCOUNT_NAME/KEY/SAS, "
    "GOOGLE_PROJECT_ID/APPLICATION_CREDENTIALS, OS_* and ST_* (Swift), RCLONE_*, RESTIC_COMPRESSION/PACK_SIZE"
)


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the key and how to set it."""


# -- parsers: text in, value out; a ValueError says what is wrong (the key and the fix are added around it) ---------
def one_line(raw: str) -> str:
    """A single line of printable text. Control characters (a newline in a repository URL becomes a line of root's
    ssh config) are refused in every key but the multi-line ones."""
    text = raw.strip()
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError("contains a control character (a newline, a tab, …)")
    return text


def whole_number(low: int, high: int | None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        text = one_line(raw)
        if not ascii_digits(text) or int(text) < low or (high is not None and int(text) > high):
            raise ValueError(f"{text!r} is not a whole number in {f'{low}-{high}' if high else f'>= {low}'}")
        return int(text)

    return parse


def boolean(raw: str) -> bool:
    lowered = one_line(raw).lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise ValueError(f"{raw!r} is not true or false")


def matching(pattern: str, what: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        text = one_line(raw)
        if not re.fullmatch(pattern, text):
            raise ValueError(f"{text!r} {what}")
        return text

    return parse


def one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        text = one_line(raw).lower()
        if text not in choices:
            raise ValueError(f"{raw!r} is not one of {', '.join(choices)}")
        return text

    return parse


def domain(raw: str) -> str:
    text = one_line(raw)
    value = _stack_field("domain", text)
    if value in EXAMPLE_DOMAINS or value.endswith(tuple(f".{d}" for d in EXAMPLE_DOMAINS)):
        raise ValueError(f"{value!r} is the example value from Pulumi.dev.yaml; set yours (a domain in your zone)")
    return value


def acme_email(raw: str) -> str:
    value = _stack_field("acme_email", one_line(raw))
    if value.rpartition("@")[2].lower() in EXAMPLE_DOMAINS:
        raise ValueError(f"{value!r} is the example value from Pulumi.dev.yaml; set yours (Let's Encrypt writes to it)")
    return value


def _stack_field(field: str, value: str) -> Any:
    """Checked by the model the VM spec uses, so the config and the spec refuse the same input."""
    other = {"domain": "api.mlapi.internal", "acme_email": "ops@mlapi.internal"}
    try:
        return getattr(StackInputs(**{**other, field: value}), field)
    except ValidationError as exc:
        raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None


def zone_id(raw: str) -> str:
    zone = one_line(raw)
    if not re.fullmatch(r"[0-9a-f]{32}", zone):
        raise ValueError(f"{zone!r} is not a 32-character hex zone ID (dashboard → Overview)")
    if zone == EXAMPLE_ZONE_ID:
        raise ValueError(
            f"{zone!r} is the example value from Pulumi.dev.yaml; set your zone's ID (dashboard → Overview)"
        )
    return zone


def ssh_public_key(raw: str) -> str:
    key = raw.strip()
    if "\n" in key or len(key) > 16384:
        raise ValueError("give exactly one key on one line")
    key = one_line(key)
    parts = key.split()
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        raise ValueError(f"must start with one of {', '.join(SSH_KEY_TYPES)} followed by the key data")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the key data is not valid base64") from None
    length = int.from_bytes(blob[:4], "big") if len(blob) >= 4 else -1
    if blob[4 : 4 + length].decode(errors="replace") != parts[0]:
        raise ValueError(f"the key data does not encode a {parts[0]} key (truncated or mismatched?)")
    if parts[1] == EXAMPLE_SSH_KEY_DATA:
        raise ValueError("this is the example key from Pulumi.dev.yaml; set your own public key")
    return key


def cidrs(raw: str) -> tuple[str, ...]:
    text = one_line(raw)
    try:
        items = json.loads(text) if text.startswith("[") else list(text.split(","))
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a JSON list ({exc.msg})") from None
    if not isinstance(items, list) or not items or not all(isinstance(item, str) for item in items):
        raise ValueError("needs at least one CIDR string")
    networks = []
    for item in items:
        try:
            network = ipaddress.ip_network(item.strip(), strict=True)
        except ValueError as exc:
            raise ValueError(f"{item.strip()!r} is not a CIDR ({exc})") from None
        if any(network.version == doc.version and network.subnet_of(doc) for doc in DOCUMENTATION_NETWORKS):
            raise ValueError(
                f"{item.strip()!r} is a documentation range (the example value from Pulumi.dev.yaml); it reaches "
                "nobody. Set the addresses you deploy from (e.g. '[\"<your IP>/32\"]')"
            )
        networks.append(str(network))
    return tuple(networks)


def readable_key_file(raw: str) -> str:
    # Kept as written (e.g. ~/.ssh/id_ed25519): ssh expands it, and no machine's home path lands in a resource.
    key_path = one_line(raw)
    expanded = Path(key_path).expanduser()
    if not expanded.is_file() or not os.access(expanded, os.R_OK):
        raise ValueError(f"{key_path} is not a readable file on this machine")
    return key_path


def cron(raw: str) -> str:
    return check_cron(one_line(raw))


def redacted(repository: str) -> str:
    """A repository URL as an error may show it: never the credentials of its userinfo."""
    parts = urlsplit(repository.removeprefix("s3:").removeprefix("rest:"))
    if parts.password:
        return repository.replace(f":{parts.password}@", ":***@")
    return repository


def restic_repository(raw: str) -> str:
    repository = one_line(raw)
    if not (repository.startswith(RESTIC_SCHEMES) or repository.startswith("/")):
        raise ValueError(f"{redacted(repository)!r} is not a restic repository URL")
    if repository.startswith("sftp:") and not sftp_target(repository)[0]:
        raise ValueError(f"{redacted(repository)!r} names no host (sftp:user@host:/path)")
    return repository


def sftp_target(repository: str) -> tuple[str, int | None]:
    """(host, port) of restic's sftp:user@host:/path or sftp://user@host:port//path."""
    rest = repository.removeprefix("sftp:")
    if rest.startswith("//"):
        authority = rest[2:].split("/", 1)[0]
        host, _, port = authority.rpartition("@")[2].partition(":")
        return host, int(port) if ascii_digits(port) else None
    authority = rest.split(":", 1)[0]
    return authority.rpartition("@")[2], None


def secret_text(raw: str) -> SecretStr:
    return SecretStr(one_line(raw))


def is_http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("https", "http") and bool(parts.hostname)


def webhook_url(raw: str) -> SecretStr:
    url = one_line(raw)
    if not is_http_url(url):
        raise ValueError("must be an http(s) URL: a Slack or Discord webhook, an ntfy topic, or any JSON receiver")
    return SecretStr(url)


def heartbeat_url(raw: str) -> SecretStr:
    url = one_line(raw)
    if not is_http_url(url) or any(c in url for c in ' "\\'):  # it goes into a curl config line in quotes
        raise ValueError("must be an http(s) URL without spaces or quotes, such as https://hc-ping.com/<uuid>")
    return SecretStr(url)


def email_addresses(raw: str) -> str:
    addresses = [part.strip() for part in one_line(raw).split(",")]
    for address in addresses:
        if not re.fullmatch(r"[^@\s,<>\"]+@[^@\s,<>\"]+\.[^@\s,<>\"]+", address):
            raise ValueError(
                f"{address!r} is not an e-mail address like oncall@yourcompany.com (several: comma-separated)"
            )
    return ", ".join(addresses)


def email_address(raw: str) -> str:
    address = email_addresses(raw)
    if "," in address:
        raise ValueError("takes one address")
    return address


def smtp_url(raw: str) -> SecretStr:
    url = one_line(raw)
    email_route(url, "", "")  # its ValueError says what is allowed, and never repeats the URL (it holds a password)
    return SecretStr(url)


def duration(raw: str) -> str:
    return check_duration(one_line(raw))


def backup_environment(raw: str) -> dict[str, SecretStr]:
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a JSON object ({exc.msg})") from None
    if not isinstance(parsed, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()):
        raise ValueError("must map environment variable names to strings")
    for name, value in parsed.items():
        if not BACKUP_ENVIRONMENT.fullmatch(name):
            raise ValueError(
                f"{name!r} is not a variable restic's backends read; allowed: {BACKUP_ENVIRONMENT_ALLOWED}"
            )
        if any(ord(c) < 0x20 for c in value):
            raise ValueError(f"the value of {name} contains a control character")
    return {key: SecretStr(value) for key, value in parsed.items()}


def private_key(raw: str) -> SecretStr:
    if "PRIVATE KEY-----" not in raw:
        raise ValueError("is not an OpenSSH private key (-----BEGIN OPENSSH PRIVATE KEY-----)")
    return SecretStr(raw)


def known_hosts(raw: str) -> str:
    lines = raw.strip().splitlines()
    if any(any(ord(c) < 0x20 for c in line) for line in lines):
        raise ValueError("contains a control character inside a line")
    return "\n".join(lines)


def backup_keep(raw: str) -> dict[str, int]:
    keep = dict(DEFAULT_BACKUP_KEEP)
    for part in one_line(raw).split(","):
        name, _, number = part.strip().partition("=")
        if name not in keep or not ascii_digits(number) or int(number) > 1000:
            raise ValueError(f"{part.strip()!r}: use daily=N, weekly=N, monthly=N (N from 0 to 1000)")
        keep[name] = int(number)
    return keep


# -- the table --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Key:
    name: str  # the Pulumi config key
    field: str  # where it lands in DeployConfig
    type: Any
    default: Any
    example: str  # what the error and the docs show after `pulumi config set <name>`
    description: str
    parse: Callable[[str], Any] = one_line
    required: bool = False


KEYS: tuple[Key, ...] = (
    Key("domain", "domain", str, ..., "api.yourcompany.com", "fully-qualified domain name to serve", domain, True),
    Key("acmeEmail", "acme_email", str, ..., "ops@yourcompany.com", "Let's Encrypt account email", acme_email, True),
    Key("cloudflareZoneId", "cloudflare_zone_id", str, ..., "<32 hex characters>",
        "Cloudflare zone ID holding domain", zone_id, True),
    Key("sshPublicKey", "ssh_public_key", str, ..., '"$(cat ~/.ssh/id_ed25519.pub)"',
        "OpenSSH public key (ed25519, ecdsa or rsa)", ssh_public_key, True),
    Key("sshAllowedCidrs", "ssh_allowed_cidrs", tuple[str, ...], ..., "'[\"<your IP>/32\"]'",
        'CIDRs allowed on port 22 (JSON list or comma list); \'["0.0.0.0/0", "::/0"]\' opens it to everyone',
        cidrs, True),
    Key("sshPrivateKeyPath", "ssh_private_key_path", str | None, None, "~/.ssh/id_ed25519",
        "private key file for the deploy (default: ssh-agent)", readable_key_file),
    Key("serverType", "server_type", str, "cx23", "cx23", "Hetzner server type",
        matching(r"[a-z]{2,4}\d{2,3}[a-z]*", "does not look like a Hetzner type (cx23, cax11, …)")),
    Key("location", "location", str, "nbg1", "nbg1", f"Hetzner location, one of {', '.join(HETZNER_LOCATIONS)}",
        matching("|".join(HETZNER_LOCATIONS), "is not a Hetzner location")),
    Key("image", "image", str, "ubuntu-24.04", "ubuntu-24.04", "Hetzner OS image"),
    Key("acmeStaging", "acme_staging", bool, False, "true", "use Let's Encrypt's staging CA (true/false)", boolean),
    Key("modelImage", "model_image", str | None, None, "ghcr.io/acme/model:1.2",
        "registry image instead of building app/ on the host",
        matching(r"[a-z0-9][a-z0-9._/:@-]*", "is not an image reference")),
    Key("modelProject", "model_project", str | None, None, "examples/penguins",
        "model project to serve (mlapi.toml, its data and code; docs/model-projects.md): a directory relative to the "
        "Pulumi project, or absolute; default: the bundled diabetes model"),
    Key("dataAccessKeyId", "data_access_key_id", str | None, None, "AKIA…",
        "the access key the stack reads a model project's s3:// data with (needed for such data; a key allowed "
        "s3:GetObject on that object only)", matching(r"[A-Za-z0-9+/=_-]{8,128}", "is not an access key ID")),
    Key("dataSecretAccessKey", "data_secret_access_key", SecretStr | None, None, "--secret <secret access key>",
        "the secret of dataAccessKeyId (a secret: a swarm secret on the VM, never in an image)", secret_text),
    Key("retrainSchedule", "retrain_schedule", str, DEFAULT_RETRAIN_SCHEDULE, '"0 3 * * *"',
        "cron expression for scheduled retraining", cron),
    Key("modelReplicas", "model_replicas", int, DEFAULT_MODEL_REPLICAS, "2",
        "replicas of the model service across all nodes (1-64)", whole_number(1, 64)),
    Key("workers", "workers", int, 0, "2",
        f"worker VMs joining the swarm over a private network (0-{MAX_WORKERS}; docs/operations.md)",
        whole_number(0, MAX_WORKERS)),
    Key("workerServerType", "worker_server_type", str | None, None, "cx33",
        "Hetzner server type of the workers (default: serverType)",
        matching(r"[a-z]{2,4}\d{2,3}[a-z]*", "does not look like a Hetzner type (cx23, cax11, …)")),
    Key("acmeChallenge", "acme_challenge", str, "tls", "dns",
        "how Let's Encrypt validates the domain: tls (TLS-ALPN on port 443) or dns (DNS-01 with a scoped Cloudflare "
        "token the program creates)", one_of(ACME_CHALLENGES)),
    Key("loadBalancer", "load_balancer", bool, False, "true",
        "a Hetzner Load Balancer in front of Traefik, PROXY protocol (true/false)", boolean),
    Key("loadBalancerType", "load_balancer_type", str, "lb11", "lb11", "Hetzner load balancer type (lb11, lb21, lb31)",
        matching(r"lb\d{2}", "is not a Hetzner load balancer type")),
    Key("rateLimitPerSecond", "rate_limit_per_s", int, 100, "100",
        "requests per second per client address at the edge, 429 beyond (1-100000)", whole_number(1, 100_000)),
    Key("rateLimitBurst", "rate_limit_burst", int, 200, "200", "requests a client may burst above the rate (1-100000)",
        whole_number(1, 100_000)),
    Key("inFlightPerClient", "in_flight_per_client", int, 32, "32",
        "concurrent requests per client address at the edge (1-10000)", whole_number(1, 10_000)),
    Key("volumeSize", "volume_size", int, 10, "10", "data volume size in GB (10-10240)", whole_number(10, 10240)),
    Key("keepDataVolume", "keep_data_volume", bool, True, "true", "keep the data volume on `pulumi destroy`",
        boolean),
    Key("dataVolumeId", "data_volume_id", int | None, None, "12345678",
        "attach this existing (kept) volume instead of creating one", whole_number(1, None)),
    Key("dnsProxied", "dns_proxied", bool, False, "true",
        "proxy the DNS record through Cloudflare (only with acmeChallenge=dns)", boolean),
    Key("publicDocs", "public_docs", bool, True, "false",
        "serve /docs, /redoc and /openapi.json to the internet (true/false)", boolean),
    Key("hstsPreload", "hsts_preload", bool, False, "true",
        "ask browsers' HSTS preload lists to include the domain (true/false; hard to undo: docs/security.md)",
        boolean),
    Key("serverBackups", "server_backups", bool, False, "true",
        "Hetzner's daily server backups (true/false; +20 % of the server price, volumes not included)", boolean),
    Key("backupRepository", "backup_repository", str | None, None, "sftp:u123456@u123456.your-storagebox.de:/mlapi",
        "restic repository for backups (sftp:, s3:, rest:, b2:, azure:, gs:, swift:, rclone: or an absolute path)",
        restic_repository),
    Key("backupPassword", "backup_password", SecretStr | None, None, "--secret <long random password>",
        "restic repository password (a secret)", secret_text),
    Key("backupEnvironment", "backup_environment", dict[str, SecretStr], {},
        """--secret '{"AWS_ACCESS_KEY_ID": "…", "AWS_SECRET_ACCESS_KEY": "…"}'""",
        "the repository's credentials as environment variables, a JSON object (a secret; restic's variables only)",
        backup_environment),
    Key("backupSshKey", "backup_ssh_key", SecretStr | None, None, '--secret "$(cat backup_ed25519)"',
        "private key for an sftp: repository (a secret)", private_key),
    Key("backupSshKnownHosts", "backup_ssh_known_hosts", str | None, None,
        '"$(ssh-keyscan -p 23 u123456.your-storagebox.de)"', "the sftp host's keys", known_hosts),
    Key("backupSchedule", "backup_schedule", str, DEFAULT_BACKUP_SCHEDULE, '"30 2 * * *"',
        "cron expression for backups", cron),
    Key("backupKeep", "backup_keep", dict[str, int], DEFAULT_BACKUP_KEEP, "daily=7,weekly=4,monthly=6",
        "snapshots kept by restic forget", backup_keep),
    Key("alertWebhookUrl", "alert_webhook_url", SecretStr | None, None,
        "--secret https://hooks.slack.com/services/…",
        "where Alertmanager sends alerts and their resolve notices: a Slack or Discord webhook (their formats), "
        "or any other URL (Alertmanager's JSON, e.g. ntfy); a secret", webhook_url),
    Key("alertEmail", "alert_email", str | None, None, "oncall@yourcompany.com",
        "where Alertmanager e-mails alerts and their resolve notices (several: comma-separated); needs alertSmtpUrl",
        email_addresses),
    Key("alertSmtpUrl", "alert_smtp_url", SecretStr | None, None,
        "--secret smtp://user:password@smtp.yourcompany.com:587",
        "the SMTP server for alertEmail: smtp://…:587 (STARTTLS, required) or smtps://…:465, user and password "
        "percent-encoded; a secret", smtp_url),
    Key("alertEmailFrom", "alert_email_from", str | None, None, "alerts@yourcompany.com",
        "the alert e-mails' sender (default: mlapi-alerts@ the domain); some SMTP services accept only verified ones",
        email_address),
    Key("heartbeatUrl", "heartbeat_url", SecretStr | None, None, "--secret https://hc-ping.com/<uuid>",
        "pinged every 5 min while the edge answers, and after each good backup and retrain, so a checker outside the "
        "VM (healthchecks.io, an Uptime Kuma push monitor) tells you when the pings stop; a secret", heartbeat_url),
    Key("monitoringRetention", "monitoring_retention", str, DEFAULT_RETENTION, "30d",
        "how long Prometheus keeps its samples (at most 1GB of them either way)", duration),
    Key("latencyObjectiveMs", "latency_objective_ms", int, DEFAULT_LATENCY_OBJECTIVE_MS, "500",
        "the API's p99 latency objective at the edge in ms: above it for 10 min, an alert (10-60000)",
        whole_number(10, 60_000)),
)  # fmt: skip
BY_NAME = {key.name: key for key in KEYS}


class _Derived(BaseModel):
    """What DeployConfig works out from several keys (its fields: the rows of KEYS)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    def alert_routes(self, domain: str) -> AlertRoutes:
        """Where Alertmanager sends alerts (holds secrets: the webhook URL, the SMTP password)."""
        webhook = self.alert_webhook_url.get_secret_value() if self.alert_webhook_url else None
        email = None
        if self.alert_email and self.alert_smtp_url:
            sender = self.alert_email_from or f"mlapi-alerts@{domain}"
            email = email_route(self.alert_smtp_url.get_secret_value(), self.alert_email, sender)
        return AlertRoutes(webhook, email)

    @property
    def data_credentials(self) -> str | None:
        """The AWS credentials file for s3:// model data (holds a secret), if the keys are set."""
        if not (self.data_access_key_id and self.data_secret_access_key):
            return None
        return credentials_file_text(self.data_access_key_id, self.data_secret_access_key.get_secret_value())

    @property
    def backup(self) -> BackupSettings | None:
        repository = self.backup_repository
        if not repository:
            return None
        host, port = sftp_target(repository) if repository.startswith("sftp:") else (None, None)
        keep = self.backup_keep
        return BackupSettings(
            repository,
            self.backup_schedule,
            keep["daily"],
            keep["weekly"],
            keep["monthly"],
            sftp_host=host,
            sftp_port=port,
        )


DeployConfig = create_model(
    "DeployConfig",
    __base__=_Derived,
    __doc__="The validated configuration of a stack: one field per row of KEYS.",
    **{key.field: (key.type, key.default) for key in KEYS},
)


def error(key: str, problem: str) -> ConfigError:
    row = BY_NAME[key]
    return ConfigError(
        f"configuration '{key}' ({row.description}): {problem}. Set it with: pulumi config set {key} {row.example}"
    )


# Rules between keys: (key to name, refused when, why).
CROSS_CHECKS: tuple[tuple[str, Callable[[dict[str, Any]], bool], str], ...] = (
    (
        "alertSmtpUrl",
        lambda v: bool(v.get("alert_email")) and not v.get("alert_smtp_url"),
        "is required when alertEmail is set: Alertmanager sends the e-mails through it",
    ),
    (
        "alertEmail",
        lambda v: bool(v.get("alert_smtp_url") or v.get("alert_email_from")) and not v.get("alert_email"),
        "is required when alertSmtpUrl or alertEmailFrom is set: nobody would receive the e-mails",
    ),
    (
        "backupPassword",
        lambda v: bool(v.get("backup_repository")) and not v.get("backup_password"),
        "is required when backupRepository is set",
    ),
    (
        "dataSecretAccessKey",
        lambda v: bool(v.get("data_access_key_id")) and not v.get("data_secret_access_key"),
        "is required when dataAccessKeyId is set",
    ),
    (
        "dataAccessKeyId",
        lambda v: bool(v.get("data_secret_access_key")) and not v.get("data_access_key_id"),
        "is required when dataSecretAccessKey is set",
    ),
    (
        "modelImage",
        lambda v: bool(v.get("workers")) and not v.get("model_image"),
        "is required with workers > 0: every node pulls the model image from a registry (an image built on the "
        "manager exists only there)",
    ),
    (
        # Behind Cloudflare's proxy, Let's Encrypt's TLS-ALPN (and HTTP) validation reaches Cloudflare, not Traefik:
        # the first certificate may be issued before the proxy is on, but every renewal fails, silently.
        "dnsProxied",
        lambda v: bool(v.get("dns_proxied")) and v.get("acme_challenge", "tls") != "dns",
        "true is refused with acmeChallenge=tls: the certificate is validated over a direct connection to the "
        "server (TLS-ALPN), which Cloudflare's proxy intercepts, so renewals would fail silently. Use "
        "`pulumi config set acmeChallenge dns` first (DNS-01 works behind the proxy)",
    ),
)


def load_config(get: Callable[[str], str | None]) -> DeployConfig:
    """Build the deploy configuration from a ``get(key) -> str | None`` (``pulumi.Config().get``)."""
    values: dict[str, Any] = {}
    for key in KEYS:
        raw = get(key.name)
        if raw is None or not str(raw).strip():
            if key.required:
                raise error(key.name, "is required and not set")
            continue
        try:
            values[key.field] = key.parse(str(raw))
        except ValueError as exc:
            raise error(key.name, str(exc)) from None
    for name, refused, why in CROSS_CHECKS:
        if refused(values):
            raise error(name, why)
    return DeployConfig(**values)


def reference_table() -> str:
    """docs/configuration.md's table, generated from KEYS (a test keeps the file equal to it)."""
    rows = ["| key | required | default | example | meaning |", "| --- | --- | --- | --- | --- |"]
    for key in KEYS:
        default = "" if key.required or key.default in (None, {}) else key.default
        if isinstance(default, dict):
            default = ",".join(f"{k}={v}" for k, v in default.items())
        elif isinstance(default, bool):
            default = str(default).lower()
        cells = [f"`{key.name}`", "yes" if key.required else "", f"`{default}`" if default != "" else "",
                 f"`{key.example}`", key.description]  # fmt: skip
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"
