"""From the replica's and the edge's own metrics to the operator's webhook, for real: the service serves skewed inputs
and a failed backup is recorded in its data directory; Traefik's release binary serves a certificate five days from its
end; Debian's Prometheus scrapes them with the rules the program renders (every `for` cut to 1 s) and sends to Debian's
Alertmanager with the program's routing; FeatureDrift, BackupFailed and CertificateExpiring arrive at a webhook
receiver on 127.0.0.1, and a rule with nothing to say (a missing replica) stays quiet."""

from __future__ import annotations

import http.server
import json
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from app.settings import Settings
from infra.local.images import traefik_binary
from infra.spec.inputs import StackInputs
from infra.spec.monitoring import (
    MODEL_JOB,
    AlertRoutes,
    ScrapeTargets,
    alert_rules,
    prometheus_config,
    rules_document,
)
from infra.spec.traefik import traefik_flags
from tests.support.alerting import running_alertmanager, wait_for
from tests.support.service import ADMIN_TOKEN, INGEST_TOKEN, free_port, record, served_app
from tests.support.shims import installed_tool


class Received(http.server.BaseHTTPRequestHandler):
    notifications: list[dict]

    def do_POST(self) -> None:
        self.notifications.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def webhook_receiver() -> Iterator[tuple[str, list[dict]]]:
    notifications: list[dict] = []
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), type("Handler", (Received,), {"notifications": notifications})
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/alerts", notifications
    finally:
        server.shutdown()


@contextmanager
def running_prometheus(tmp_path: Path, app: str, alertmanager: str, traefik: str = "127.0.0.1:9") -> Iterator[str]:
    """The program's prometheus.yml and rules, with the replicas found at ``app`` instead of by swarm's DNS."""
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(rules_document(alert_rules(1, backups=True), wait="1s")))
    config = yaml.safe_load(prometheus_config(ScrapeTargets("mlapi-model", 8000, traefik, alertmanager), interval_s=1))
    config["rule_files"] = [str(rules)]
    (model_job,) = [job for job in config["scrape_configs"] if job["job_name"] == MODEL_JOB]
    del model_job["dns_sd_configs"]
    model_job["static_configs"] = [{"targets": [app]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port, log = free_port(), tmp_path / "prometheus.log"
    process = subprocess.Popen(
        [installed_tool("prometheus", "prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=log.open("w"),
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def alert_names(notifications: list[dict]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for notification in notifications:
        for alert in notification["alerts"]:
            if alert["status"] == "firing":
                found.setdefault(alert["labels"]["alertname"], []).append(alert)
    return found


def test_drift_and_a_failed_backup_reach_the_webhook_and_a_healthy_replica_does_not(tmp_path: Path) -> None:
    data, managed, watched = tmp_path / "data", tmp_path / "alertmanager", tmp_path / "prometheus"
    for directory in (data, managed, watched):
        directory.mkdir()
    now = time.time()
    (data / "backup-status.json").write_text(
        json.dumps({"last_success_unixtime": now - 86400, "last_failure_unixtime": now, "snapshots": 3})
    )
    settings = Settings(
        data_dir=data, admin_token=ADMIN_TOKEN, ingest_token=INGEST_TOKEN, drift_interval_s=1, drift_window=200
    )
    skewed = json.dumps({"features": record(bmi=0.12)}).encode()  # every request the same heavy patient
    with (
        served_app(settings) as app,
        webhook_receiver() as (url, notifications),
        running_alertmanager(managed, AlertRoutes(webhook_url=url)) as (api, log),
        running_prometheus(watched, app, api.removeprefix("http://")) as prometheus,
    ):
        for _ in range(150):
            request = urllib.request.Request(
                f"http://{app}/predict", data=skewed, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=10) as answer:
                assert answer.status == 200
        wait_for(lambda: {"FeatureDrift", "BackupFailed"} <= set(alert_names(notifications)), 90,
                 f"FeatureDrift and BackupFailed at the webhook (Prometheus at {prometheus})", log)  # fmt: skip
    received = alert_names(notifications)
    drifted = {alert["labels"]["feature"] for alert in received["FeatureDrift"]}
    assert "bmi" in drifted, drifted
    assert received["BackupFailed"][0]["annotations"]["runbook"].startswith("`mlapi logs backup`")
    assert "ModelReplicaMissing" not in received  # one replica expected, one answering its metrics


@contextmanager
def running_traefik(tmp_path: Path, days_left: int) -> Iterator[str]:
    """Traefik serving a certificate for api.test that ends in ``days_left`` days, with the spec's own metrics flags
    (only the metrics entry point moved to 127.0.0.1); yields the metrics entry point's host:port."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-days", str(days_left), "-subj", "/CN=api.test", "-addext", "subjectAltName=DNS:api.test",
         "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    dynamic = tmp_path / "dynamic.yml"
    certificate = {"certFile": str(tmp_path / "cert.pem"), "keyFile": str(tmp_path / "key.pem")}
    dynamic.write_text(yaml.safe_dump({"tls": {"certificates": [certificate]}}))
    metrics_port, https_port = free_port(), free_port()
    inputs = StackInputs(domain="api.test", acme_email="ops@api.test")
    spec_metrics = [flag for flag in traefik_flags(inputs, "mlapi") if flag.startswith("--metrics.")]
    assert "--metrics.prometheus=true" in spec_metrics
    binary = tmp_path / "traefik"
    binary.write_bytes(traefik_binary())
    binary.chmod(0o755)
    log = tmp_path / "traefik.log"
    process = subprocess.Popen(
        [str(binary), f"--entrypoints.websecure.address=127.0.0.1:{https_port}",
         f"--entrypoints.metrics.address=127.0.0.1:{metrics_port}", f"--providers.file.filename={dynamic}",
         "--log.level=ERROR", *spec_metrics],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield f"127.0.0.1:{metrics_port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_a_certificate_near_its_end_reaches_the_webhook(tmp_path: Path) -> None:
    """Traefik's own certificate metric (traefik_tls_certs_not_after) through the program's CertificateExpiring rule:
    a certificate 5 days from its end (renewals failing for weeks) pages with its name, before a client sees it."""
    managed, watched, edge = tmp_path / "alertmanager", tmp_path / "prometheus", tmp_path / "edge"
    for directory in (managed, watched, edge):
        directory.mkdir()
    with (
        running_traefik(edge, days_left=5) as traefik,
        webhook_receiver() as (url, notifications),
        running_alertmanager(managed, AlertRoutes(webhook_url=url)) as (api, log),
        running_prometheus(watched, "127.0.0.1:9", api.removeprefix("http://"), traefik=traefik),
    ):
        wait_for(lambda: "CertificateExpiring" in alert_names(notifications), 90,
                 f"CertificateExpiring at the webhook (Traefik's log: {(edge / 'traefik.log').read_text()[-500:]})",
                 log)  # fmt: skip
    (alert,) = {a["labels"]["cn"]: a for a in alert_names(notifications)["CertificateExpiring"]}.values()
    assert alert["labels"]["cn"] == "api.test"
    assert alert["annotations"]["summary"] == "the certificate for api.test expires within 14 days"
    assert alert["annotations"]["runbook"].startswith("`mlapi logs edge")
