"""Monitoring as data: the alert rules, Prometheus' scrape configuration and Alertmanager's routing, rendered as the
files the two services on the manager read (their service specs: infra/spec/stack.py).

Each alert rule has a runbook line: what it means and the first thing to do. `promtool check rules` and `promtool test
rules` run against the rules file in `make test` (tests/unit/test_alert_rules.py), `promtool check config` and
`amtool check-config` against the other two (tests/unit/test_monitoring.py).

Metric names are the app's (app/metrics.py); the replicas are scraped as job ``mlapi-model``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

# The official images on the VM (the local stack runs Debian's binaries of these lines: infra/local/images.py).
PROMETHEUS_IMAGE = "prom/prometheus:v3.5.0"
ALERTMANAGER_IMAGE = "prom/alertmanager:v0.28.1"
NODE_EXPORTER_IMAGE = "prom/node-exporter:v1.9.1"
POSTGRES_EXPORTER_IMAGE = "prometheuscommunity/postgres-exporter:v0.17.1"
PROMETHEUS_SERVICE = "mlapi-prometheus"
ALERTMANAGER_SERVICE = "mlapi-alertmanager"
NODE_EXPORTER_SERVICE = "mlapi-node-exporter"  # one task on every node: the host's own metrics
PROMETHEUS_PORT = 9090
ALERTMANAGER_PORT = 9093
NODE_EXPORTER_PORT = 9100
NODE_JOB = "node"
POSTGRES_EXPORTER_SERVICE = "mlapi-postgres-exporter"  # with workers, where PostgreSQL holds models and logs
POSTGRES_EXPORTER_PORT = 9187
PROMETHEUS_UID = 65534  # nobody: the official images' user
CONFIG_DIR = "/etc/prometheus"  # prometheus.yml and rules.yml, from the host (read-only)
RULES_FILE = "rules.yml"
ALERTMANAGER_CONFIG_SECRET = "mlapi-alertmanager-config"  # noqa: S105 — a secret's base name: it holds the webhook URL
ALERTMANAGER_CONFIG_FILE = "alertmanager.yml"
DEFAULT_RETENTION = "15d"
RETENTION_SIZE = "1GB"  # a tenth of the smallest volume: the prediction log and the models keep the rest
_DURATION = re.compile(r"^(\d+(y|w|d|h|ms|m|s))+$")
MODEL_JOB = "mlapi-model"
BACKUP_MAX_AGE_S = 26 * 3600
DRIFT_PSI = 0.2
DRIFT_MIN_WINDOW = 100  # fewer recent predictions than this: PSI is noise
DISK_MIN_FREE = 0.15
MEMORY_MAX_USED = 0.9
RETRAIN_FAILURES = 3
EDGE_ENTRYPOINT = "websecure"  # Traefik's HTTPS entry point: what API consumers reach
EDGE_MAX_ERRORS = 0.01  # of the answers at the edge, 5xx
EDGE_MIN_REQUESTS = 100  # in the 5-min window: below it, one 502 is not a trend (as `mlapi status` counts)
DEFAULT_LATENCY_OBJECTIVE_MS = 1000
CERT_MIN_DAYS = 14  # Traefik renews 30 days ahead: under 14 days, renewal has failed for two weeks


@dataclass(frozen=True)
class AlertRule:
    name: str
    expr: str
    wait: str  # Prometheus' `for`: how long the condition holds before the alert fires
    summary: str
    runbook: str
    severity: str = "page"  # page: someone acts now; ticket: within a working day

    def as_rule(self) -> dict[str, Any]:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.wait,
            "labels": {"severity": self.severity},
            "annotations": {"summary": self.summary, "runbook": self.runbook},
        }


def latency_buckets(objective_ms: int) -> tuple[float, ...]:
    """Traefik's request-duration buckets in seconds, the objective among them, so that the p99 alert compares with
    a bucket bound rather than a value interpolated between 0.3 and 1.2 s (Traefik's defaults)."""
    return tuple(sorted({0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, objective_ms / 1000}))


def edge_rules(latency_objective_ms: int) -> list[AlertRule]:
    """What API consumers see, from Traefik's metrics at the HTTPS entry point."""
    requests = f'traefik_entrypoint_requests_total{{entrypoint="{EDGE_ENTRYPOINT}"}}'
    errors = f'traefik_entrypoint_requests_total{{entrypoint="{EDGE_ENTRYPOINT}", code=~"5.."}}'
    buckets = f'traefik_entrypoint_request_duration_seconds_bucket{{entrypoint="{EDGE_ENTRYPOINT}"}}'
    objective_s = latency_objective_ms / 1000
    return [
        AlertRule(
            "EdgeErrors",
            f"sum(rate({errors}[5m])) / sum(rate({requests}[5m])) > {EDGE_MAX_ERRORS} "
            f"and sum(increase({requests}[5m])) >= {EDGE_MIN_REQUESTS}",
            "5m",
            f"more than {EDGE_MAX_ERRORS:.0%} of the API's answers are 5xx",
            "`mlapi logs edge --since 15m` shows which route and status; `mlapi logs model` the replica's traceback; "
            "`mlapi rollback` if it began with a new version",
        ),
        AlertRule(
            "EdgeSlow",
            f"histogram_quantile(0.99, sum by (le) (rate({buckets}[5m]))) > {objective_s:g} "
            f"and sum(increase({requests}[5m])) >= {EDGE_MIN_REQUESTS}",
            "10m",
            f"the API's p99 latency is above its objective of {latency_objective_ms} ms",
            "`mlapi status` shows the replicas and their memory; large batches or a slower model raise it: scale "
            "(`modelReplicas`, workers) or raise `latencyObjectiveMs`",
            "ticket",
        ),
        AlertRule(
            "CertificateExpiring",
            f"min by (cn) (traefik_tls_certs_not_after) - time() < {CERT_MIN_DAYS} * 86400",
            "1h",
            f"the certificate for {{{{ $labels.cn }}}} expires within {CERT_MIN_DAYS} days",
            "`mlapi logs edge --since 24h` shows why Let's Encrypt refused the renewal (DNS, port 443, rate limits)",
        ),
    ]


def alert_rules(
    replicas: int, backups: bool, latency_objective_ms: int = DEFAULT_LATENCY_OBJECTIVE_MS
) -> tuple[AlertRule, ...]:
    """The rules for a stack of ``replicas`` model replicas; the backup rules only where backups are configured."""
    rules = [
        AlertRule(
            "ModelReplicaMissing",
            f'count(up{{job="{MODEL_JOB}"}} == 1) < {replicas} or absent(up{{job="{MODEL_JOB}"}} == 1)',
            "2m",
            f"fewer than {replicas} model replicas answer their metrics",
            "`mlapi status` shows which task is not running and why; `mlapi logs model --since 15m` has its last words",
        ),
        AlertRule(
            "RetrainFailing",
            f"max(mlapi_retrain_consecutive_failures) >= {RETRAIN_FAILURES}",
            "5m",
            f"the last {RETRAIN_FAILURES} or more retrains failed",
            "`mlapi versions` lists each failed retrain's reason (data, a schema change, memory); the served model "
            "is unchanged",
            "ticket",
        ),
        AlertRule(
            "FeatureDrift",
            f"max by (feature) (mlapi_feature_psi) > {DRIFT_PSI} "
            f"and on() max(mlapi_drift_window_predictions) >= {DRIFT_MIN_WINDOW}",
            "1h",
            f"the inputs of {{{{ $labels.feature }}}} have drifted from the training data (PSI above {DRIFT_PSI})",
            "`mlapi drift` and `mlapi predictions --since 24h` show what changed; send ground truth to /observations "
            "and `mlapi retrain`",
            "ticket",
        ),
        AlertRule(
            "DataVolumeLow",
            f"min(mlapi_data_volume_free_bytes / mlapi_data_volume_size_bytes) < {DISK_MIN_FREE}",
            "10m",
            f"less than {DISK_MIN_FREE:.0%} free on the data volume",
            "grow it (`pulumi config set volumeSize`, then `pulumi up`) or lower the prediction log's retention",
        ),
        AlertRule(
            "MemoryNearLimit",
            f"max(mlapi_memory_usage_bytes / mlapi_memory_limit_bytes) > {MEMORY_MAX_USED}",
            "10m",
            f"a model replica uses more than {MEMORY_MAX_USED:.0%} of its memory limit",
            "a larger serverType raises the limit; `mlapi status` shows the model, whose size sets the use",
            "ticket",
        ),
        *edge_rules(latency_objective_ms),
    ]
    if backups:
        success = "max(mlapi_backup_last_success_timestamp_seconds)"
        rules += [
            AlertRule(
                "BackupFailed",
                f"max(mlapi_backup_last_failure_timestamp_seconds) > {success}",
                "5m",
                "the last backup run failed",
                "`mlapi logs backup` names the cause (repository, password, space); the next run retries",
            ),
            AlertRule(
                "BackupStale",
                f"{success} > 0 and time() - {success} > {BACKUP_MAX_AGE_S}",
                "5m",
                f"no successful backup for {BACKUP_MAX_AGE_S // 3600} h",
                "`mlapi logs backup`: is the cron job running, does the repository answer?",
            ),
            AlertRule(
                "BackupNeverSucceeded",
                f"{success} == 0",
                f"{BACKUP_MAX_AGE_S // 3600}h",
                f"backups are configured but none has succeeded in {BACKUP_MAX_AGE_S // 3600} h",
                "`mlapi logs backup`; run one now with `mlapi ssh` then `mlapi-backup`",
            ),
        ]
    return tuple(rules)


def rules_document(rules: tuple[AlertRule, ...], wait: str | None = None) -> dict[str, Any]:
    """A Prometheus rules file; ``wait``: every rule's `for` instead of its own (the local stack's tests)."""
    chosen = tuple(replace(rule, wait=wait) for rule in rules) if wait else rules
    return {"groups": [{"name": "mlapi", "rules": [rule.as_rule() for rule in chosen]}]}


def check_duration(value: str) -> str:
    """A Prometheus duration (15d, 12h, 1w2d); ValueError saying what is allowed."""
    value = value.strip()
    if not _DURATION.match(value) or not any(ch in "123456789" for ch in value):
        raise ValueError(f"{value!r} is not a duration like 15d, 12h or 1w2d (units y, w, d, h, m, s, ms)")
    return value


@dataclass(frozen=True)
class ScrapeTargets:
    """Where Prometheus finds each job on the overlay network."""

    model_service: str  # every task of it, by swarm's DNS (tasks.<service>)
    model_port: int
    traefik: str  # host:port of Traefik's metrics entry point
    alertmanager: str  # host:port
    node_exporter: str = NODE_EXPORTER_SERVICE  # every task of it (one a node), by swarm's DNS
    postgres_exporter: str | None = None  # host:port, with workers (PostgreSQL); None: no such job


def prometheus_config(targets: ScrapeTargets, interval_s: int) -> str:
    """prometheus.yml: the replicas and every node's exporter (each task, as swarm's DNS lists them), Traefik,
    Alertmanager, itself and, with workers, PostgreSQL's exporter; the rules file beside it; alerts to
    Alertmanager."""
    every = f"{interval_s}s"

    def tasks(job: str, service: str, port: int) -> dict[str, Any]:
        return {
            "job_name": job,
            "dns_sd_configs": [{"names": [f"tasks.{service}"], "type": "A", "port": port, "refresh_interval": every}],
        }

    document = {
        "global": {"scrape_interval": every, "evaluation_interval": every, "scrape_timeout": f"{min(interval_s, 10)}s"},
        "rule_files": [f"{CONFIG_DIR}/{RULES_FILE}"],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [targets.alertmanager]}]}]},
        "scrape_configs": [
            tasks(MODEL_JOB, targets.model_service, targets.model_port),
            tasks(NODE_JOB, targets.node_exporter, NODE_EXPORTER_PORT),
            {"job_name": "traefik", "static_configs": [{"targets": [targets.traefik]}]},
            {"job_name": "alertmanager", "static_configs": [{"targets": [targets.alertmanager]}]},
            {"job_name": "prometheus", "static_configs": [{"targets": [f"localhost:{PROMETHEUS_PORT}"]}]},
            *(
                [{"job_name": "postgres", "static_configs": [{"targets": [targets.postgres_exporter]}]}]
                if targets.postgres_exporter
                else []
            ),
        ],
    }
    return yaml.safe_dump(document, sort_keys=False)


def webhook_receiver(url: str) -> dict[str, Any]:
    """The receiver for ``url``, by where it points: Slack's incoming webhooks (and Mattermost's, which take the same
    payload at /hooks/), Discord's, or any other URL as Alertmanager's generic JSON webhook (ntfy, a relay, a
    healthchecks-style endpoint)."""
    parts = urlsplit(url)
    host, path = (parts.hostname or "").lower(), parts.path
    if host == "hooks.slack.com":
        return {"slack_configs": [{"api_url": url, "send_resolved": True, "title": SLACK_TITLE, "text": SLACK_TEXT}]}
    if host in {"discord.com", "discordapp.com"} and path.startswith("/api/webhooks/"):
        return {"discord_configs": [{"webhook_url": url, "send_resolved": True}]}
    return {"webhook_configs": [{"url": url, "send_resolved": True}]}


SLACK_TITLE = "[{{ .Status | toUpper }}] {{ .CommonLabels.alertname }}"
SLACK_TEXT = "{{ range .Alerts }}{{ .Annotations.summary }}\nrunbook: {{ .Annotations.runbook }}\n{{ end }}"


@dataclass(frozen=True)
class EmailRoute:
    """Alert e-mails through the operator's SMTP server (alertEmail, alertSmtpUrl, alertEmailFrom)."""

    to: str  # one address or several, comma-separated
    sender: str
    smarthost: str  # host:port; on 465 Alertmanager speaks TLS from the start, elsewhere it requires STARTTLS
    username: str | None = None
    password: str | None = None

    def as_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "to": self.to,
            "from": self.sender,
            "smarthost": self.smarthost,
            "require_tls": True,  # never a password, nor an alert, in clear text
            "send_resolved": True,
        }
        if self.username:
            config |= {"auth_username": self.username, "auth_password": self.password or ""}
        return config


def email_route(smtp_url: str, to: str, sender: str) -> EmailRoute:
    """``smtp://user:password@host:587`` (STARTTLS) or ``smtps://user:password@host:465`` (TLS from the start),
    user and password percent-encoded; ValueError saying what is allowed."""
    parts = urlsplit(smtp_url.strip())
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname or port == -1:
        raise ValueError("must look like smtp://user:password@smtp.example.org:587 or smtps://…@…:465")
    port = port or (465 if parts.scheme == "smtps" else 587)
    if parts.scheme == "smtps" and port != 465:
        raise ValueError("smtps:// (TLS from the start) works on port 465 only; use smtp://…:587 for STARTTLS")
    if parts.scheme == "smtp" and port == 465:
        raise ValueError("port 465 speaks TLS from the start: write smtps://…:465")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return EmailRoute(to, sender, f"{parts.hostname}:{port}", username, password)


@dataclass(frozen=True)
class AlertRoutes:
    """Where alerts go: a webhook, e-mail, both, or nowhere."""

    webhook_url: str | None = None
    email: EmailRoute | None = None


def alertmanager_config(routes: AlertRoutes, interval_s: int) -> str:
    """alertmanager.yml: every alert to the operator's webhook and/or e-mail, grouped by name, with a notice when it
    resolves; with neither, a receiver that sends nothing (alerts stay visible in Prometheus and `mlapi status`)."""
    receiver: dict[str, Any] = {"name": "operator"}
    if routes.webhook_url:
        receiver |= webhook_receiver(routes.webhook_url)
    if routes.email:
        receiver["email_configs"] = [routes.email.as_config()]
    route = {
        "receiver": "operator",
        "group_by": ["alertname"],
        "group_wait": f"{2 * interval_s}s",  # 30 s at the default interval
        "group_interval": f"{20 * interval_s}s",  # 5 min
        "repeat_interval": "4h",
    }
    return yaml.safe_dump({"route": route, "receivers": [receiver]}, sort_keys=False)
