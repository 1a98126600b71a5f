"""What Prometheus and Alertmanager read (infra/spec/monitoring.py, infra/spec/stack.py), through their own checkers:
`promtool check config` and `amtool check-config`; where each webhook URL goes; what the deploy step writes and what
user-data never holds; the config keys' errors."""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from infra.config.keys import ConfigError, load_config
from infra.host.cloud_init import render_user_data
from infra.host.setup import render_host_setup
from infra.spec.inputs import StackInputs
from infra.spec.monitoring import (
    ALERTMANAGER_CONFIG_FILE,
    ALERTMANAGER_CONFIG_SECRET,
    CONFIG_DIR,
    RULES_FILE,
    AlertRoutes,
    alertmanager_config,
    check_duration,
    email_route,
    webhook_receiver,
)
from infra.spec.stack import MODEL_SERVICE, build_stack
from tests.support.shims import installed_tool

INPUTS = StackInputs(domain="api.fjord-ml.net", acme_email="ops@fjord-ml.net")
SPEC = build_stack(INPUTS)
WEBHOOKS = {
    "generic": "https://ntfy.sh/mlapi-alerts-4f2a",
    "slack": "https://hooks.slack.com/services/T0000/B0000/XXXXXXXX",
    "discord": "https://discord.com/api/webhooks/123456/abcdef",
}


REQUIRED = {
    "domain": "api.fjord-ml.net",
    "acmeEmail": "ops@fjord-ml.net",
    "cloudflareZoneId": "9f3c2b1a8d7e6f5a4b3c2d1e0f9a8b7c",
    "sshPublicKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK3fPq0oE6iQqoX1wBfzv3X1x7Qb0Q2e0m1t3mJpA2bC ops",
    "sshAllowedCidrs": "198.18.0.1/32",
}
SMTP_URL = "smtp://alerts:hunter2@mail.fjord-ml.net:587"


def write_config(tmp_path: Path, spec=SPEC) -> Path:
    """The deploy step's two files under tmp_path, prometheus.yml pointing at the rules beside it."""
    assert spec.monitoring is not None
    written = {Path(item.path).name: item.content for item in spec.monitoring.files}
    (tmp_path / RULES_FILE).write_text(written[RULES_FILE])
    config = tmp_path / "prometheus.yml"
    config.write_text(written["prometheus.yml"].replace(f"{CONFIG_DIR}/", f"{tmp_path}/"))
    return config


def test_prometheus_config_and_rules_pass_promtool(tmp_path: Path) -> None:
    promtool = installed_tool("promtool", "prometheus")
    result = subprocess.run([promtool, "check", "config", str(write_config(tmp_path))], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
    document = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in document["scrape_configs"]}
    assert set(jobs) == {"mlapi-model", "node", "traefik", "alertmanager", "prometheus"}
    # Every replica and every node's exporter, by swarm's DNS; Traefik's metrics on the port only the overlay reaches.
    assert jobs["mlapi-model"]["dns_sd_configs"][0]["names"] == [f"tasks.{MODEL_SERVICE}"]
    assert jobs["node"]["dns_sd_configs"][0] == {
        "names": ["tasks.mlapi-node-exporter"], "type": "A", "port": 9100, "refresh_interval": "15s"
    }  # fmt: skip
    assert jobs["traefik"]["static_configs"][0]["targets"] == ["mlapi-traefik:8082"]
    assert "--entrypoints.metrics.address=:8082" in SPEC.traefik.command
    assert not any(port.container_port == 8082 for port in SPEC.traefik.ports)


def test_the_rules_follow_the_replicas_and_the_backups(tmp_path: Path) -> None:
    spec = build_stack(INPUTS.model_copy(update={"model_replicas": 5, "backups": True, "alert_wait": "5s"}))
    assert spec.monitoring is not None
    rules = yaml.safe_load(next(f.content for f in spec.monitoring.files if f.path.endswith(RULES_FILE)))
    by_name = {rule["alert"]: rule for rule in rules["groups"][0]["rules"]}
    assert "< 5" in by_name["ModelReplicaMissing"]["expr"] and {"BackupFailed", "BackupStale"} <= set(by_name)
    assert {rule["for"] for rule in by_name.values()} == {"5s"}
    plain = yaml.safe_load(next(f.content for f in SPEC.monitoring.files if f.path.endswith(RULES_FILE)))
    assert not {"BackupFailed", "BackupStale"} & {rule["alert"] for rule in plain["groups"][0]["rules"]}
    promtool = installed_tool("promtool", "prometheus")
    result = subprocess.run(
        [promtool, "check", "config", str(write_config(tmp_path, spec))], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


EMAIL = email_route("smtps://alerts%40fjord:p%40ss%3Aword@mail.fjord-ml.net", "oncall@fjord-ml.net", "a@fjord-ml.net")


@pytest.mark.parametrize("kind", [None, *WEBHOOKS, "email", "slack+email"])
def test_alertmanager_config_passes_amtool(tmp_path: Path, kind: str | None) -> None:
    amtool = installed_tool("amtool", "prometheus-alertmanager")
    config = tmp_path / ALERTMANAGER_CONFIG_FILE
    routes = AlertRoutes(WEBHOOKS.get((kind or "").removesuffix("+email")), EMAIL if "email" in (kind or "") else None)
    config.write_text(alertmanager_config(routes, 15))
    result = subprocess.run([amtool, "check-config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    document = yaml.safe_load(config.read_text())
    assert document["route"]["group_wait"] == "30s" and document["route"]["group_interval"] == "300s"
    [receiver] = document["receivers"]
    if kind is None:
        assert receiver == {"name": "operator"}  # nothing is sent; the program warns
    else:
        configs = [key for key in receiver if key.endswith("_configs")]
        assert len(configs) == kind.count("+") + 1
        assert all(receiver[key][0]["send_resolved"] is True for key in configs)


def test_smtp_urls_give_the_smarthost_and_credentials_and_refuse_plain_or_mismatched_tls() -> None:
    assert EMAIL.smarthost == "mail.fjord-ml.net:465"
    assert (EMAIL.username, EMAIL.password) == ("alerts@fjord", "p@ss:word")  # percent-decoded
    assert EMAIL.as_config()["require_tls"] is True
    starttls = email_route("smtp://mail.fjord-ml.net", "o@fjord-ml.net", "a@fjord-ml.net")
    assert starttls.smarthost == "mail.fjord-ml.net:587" and "auth_username" not in starttls.as_config()
    for bad, says in (
        ("http://mail.fjord-ml.net:587", "must look like smtp://"),
        ("smtp://mail.fjord-ml.net:465", "write smtps://"),
        ("smtps://mail.fjord-ml.net:587", "port 465 only"),
        ("smtp://user:secret@mail.fjord-ml.net:notaport", "must look like"),
    ):
        with pytest.raises(ValueError, match=says) as refused:
            email_route(bad, "o@fjord-ml.net", "a@fjord-ml.net")
        assert "secret" not in str(refused.value)


def test_each_webhook_url_gets_its_service_format() -> None:
    assert "slack_configs" in webhook_receiver(WEBHOOKS["slack"])
    assert "discord_configs" in webhook_receiver(WEBHOOKS["discord"])
    assert "webhook_configs" in webhook_receiver(WEBHOOKS["generic"])
    # A Slack-looking path on another host is not Slack's API.
    assert "webhook_configs" in webhook_receiver("https://hooks.slack.com.evil.example/services/T/B/X")


def test_the_deploy_step_writes_the_monitoring_files_and_user_data_never_holds_them() -> None:
    assert SPEC.monitoring is not None
    setup = render_host_setup(SPEC)
    user_data = render_user_data(SPEC, ssh_public_key="ssh-ed25519 AAAA k", data_root="/srv/mlapi",
                                 volume_device="/dev/disk/by-id/scsi-0HC_Volume_42")  # fmt: skip
    for item in SPEC.monitoring.files:
        blob = base64.b64encode(item.content.encode()).decode()
        assert blob in setup and blob not in user_data
    for directory in SPEC.monitoring.directories:
        assert f"mkdir -p {directory.path}" in setup and f"mkdir -p {directory.path}" not in user_data
    # Alertmanager's configuration holds the webhook URL: a swarm secret, never a file on the host.
    assert ALERTMANAGER_CONFIG_SECRET in SPEC.secret_bases
    assert all("alertmanager.yml" not in item.path for item in SPEC.monitoring.files)


def test_prometheus_rolls_when_its_files_change() -> None:
    other = build_stack(INPUTS.model_copy(update={"model_replicas": 3}))
    assert other.monitoring is not None and SPEC.monitoring is not None
    assert other.monitoring.prometheus.env != SPEC.monitoring.prometheus.env
    assert other.monitoring.alertmanager == SPEC.monitoring.alertmanager


@pytest.mark.parametrize("good", ["15d", "12h", "1w2d", "90m", "1y"])
def test_durations_prometheus_reads_are_accepted(good: str) -> None:
    assert check_duration(good) == good


@pytest.mark.parametrize("bad", ["", "15", "15 days", "0d", "-1d", "1.5d"])
def test_other_durations_are_refused_saying_what_is_allowed(bad: str) -> None:
    with pytest.raises(ValueError, match="like 15d, 12h or 1w2d"):
        check_duration(bad)


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("alertWebhookUrl", "hooks.slack.com/services/T/B/X", "http(s) URL"),
        ("alertWebhookUrl", "ftp://files.fjord-ml.net/x", "http(s) URL"),
        ("monitoringRetention", "two weeks", "like 15d"),
        ("latencyObjectiveMs", "1s", "whole number"),
        ("alertEmail", "oncall at fjord", "not an e-mail address"),
        ("alertSmtpUrl", "smtp://user:hunter2@mail.fjord-ml.net:465", "write smtps://"),
        ("heartbeatUrl", "hc-ping.com/uuid", "http(s) URL"),
        ("heartbeatUrl", 'https://hc-ping.com/a"b', "without spaces or quotes"),
        ("latencyObjectiveMs", "5", "10"),
    ],
)
def test_monitoring_keys_are_checked_naming_the_key(key: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'.*{re.escape(says)}.*pulumi config set {key}"):
        load_config({**REQUIRED, key: value}.get)


def test_e_mail_needs_both_a_recipient_and_a_server_and_never_echoes_the_password() -> None:
    with pytest.raises(ConfigError, match=r"'alertSmtpUrl'.*required when alertEmail is set") as refused:
        load_config({**REQUIRED, "alertEmail": "oncall@fjord-ml.net"}.get)
    with pytest.raises(ConfigError, match=r"'alertEmail'.*required when alertSmtpUrl") as refused:
        load_config({**REQUIRED, "alertSmtpUrl": SMTP_URL}.get)
    with pytest.raises(ConfigError, match=r"'alertSmtpUrl'.*write smtps://") as refused:
        load_config({**REQUIRED, "alertEmail": "o@fjord-ml.net", "alertSmtpUrl": SMTP_URL.replace("587", "465")}.get)
    assert "hunter2" not in str(refused.value)
    cfg = load_config({**REQUIRED, "alertEmail": "oncall@fjord-ml.net, cto@fjord-ml.net", "alertSmtpUrl": SMTP_URL}.get)
    routes = cfg.alert_routes("api.fjord-ml.net")
    assert routes.webhook_url is None and routes.email is not None
    assert routes.email.as_config() == {
        "to": "oncall@fjord-ml.net, cto@fjord-ml.net",
        "from": "mlapi-alerts@api.fjord-ml.net",
        "smarthost": "mail.fjord-ml.net:587",
        "require_tls": True,
        "send_resolved": True,
        "auth_username": "alerts",
        "auth_password": "hunter2",
    }
