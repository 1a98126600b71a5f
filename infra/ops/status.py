"""`mlapi status`: one look at a running stack. The host's side is infra/ops/scripts/status.sh (run on the manager, or
here for the local stack); this module reads its sections, the edge's certificate, and says what is wrong.

Reading and judging are pure functions (``parse_sections``, ``read_status``, ``problems``), tested without a stack."""

from __future__ import annotations

import json
import socket
import ssl
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from infra.ops.target import Target
from infra.spec.monitoring import PROMETHEUS_PORT, PROMETHEUS_SERVICE
from infra.spec.stack import MODEL_PORT, MODEL_SERVICE

STATUS_SCRIPT = Path(__file__).parent / "scripts" / "status.sh"
SECTION = "### "
# What "wrong" means: the alert rules' thresholds (infra/spec/monitoring.py), so `mlapi status` and the alerts agree;
# with Prometheus answering, its firing alerts are problems too.
CERTIFICATE_MIN_DAYS = 14
BACKUP_MAX_AGE_S = 26 * 3600
DISK_MIN_FREE = 0.15
DRIFT_MAX_PSI = 0.2
DRIFT_MIN_WINDOW = 100  # fewer recent predictions than this: PSI is noise
EDGE_MAX_5XX = 0.01  # of the last hour's HTTPS requests
EDGE_MIN_REQUESTS = 100  # fewer: a ratio of noise


@dataclass
class Replica:
    node: str
    state: str
    version: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Status:
    target: str
    url: str
    certificate: dict[str, Any] | None = None  # issuer, not_after, days_left; or error
    desired: int | None = None
    replicas: list[Replica] = field(default_factory=list)  # tasks desired running, with what the local ones answer
    current_version: str | None = None
    versions: int = 0
    last_retrain: dict[str, Any] | None = None
    backup: dict[str, Any] | None = None
    disk: dict[str, int] | None = None  # size, free (bytes)
    drift: dict[str, Any] | None = None
    alerts: list[dict[str, str]] | None = None  # firing in Prometheus: name, severity, summary, since
    edge: dict[str, int] | None = None  # the last hour at the edge: requests_1h, errors_5xx_1h
    errors: list[str] = field(default_factory=list)  # what could not be read, and why

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "problems": problems(self)}


def parse_sections(output: str) -> dict[str, str]:
    """The status script's output by section name."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if line.startswith(SECTION):
            current = sections.setdefault(line[len(SECTION) :].strip(), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines).strip() for name, lines in sections.items()}


def json_lines(text: str) -> tuple[list[dict], list[str]]:
    """The JSON objects of a section, one per line, and the lines that were not JSON (errors from the host)."""
    parsed, other = [], []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            other.append(line)
            continue
        if isinstance(value, dict):
            parsed.append(value)
        else:
            other.append(line)
    return parsed, other


def replica_answers(text: str) -> dict[str, dict]:
    """What each replica on the manager said, by task ID ("TASK_ID JSON" lines)."""
    answers = {}
    for line in text.splitlines():
        task, _, document = line.partition(" ")
        try:
            answers[task] = json.loads(document)
        except ValueError:
            answers[task] = {"error": document[:300] or "no answer"}
    return answers


def scraped_versions(addresses: str, versions: dict[str, str]) -> dict[str, str]:
    """The version Prometheus scraped from each task, by task ID: "TASK_ID 10.0.1.5/24 ..." lines matched to its
    targets' instances ("10.0.1.5:8000")."""
    by_address = {instance.rsplit(":", 1)[0]: version for instance, version in versions.items()}
    found = {}
    for line in addresses.splitlines():
        task, *networks = line.split()
        for address in networks:
            if address.split("/")[0] in by_address:
                found[task] = by_address[address.split("/")[0]]
    return found


def json_document(text: str, section: str, errors: list[str]) -> dict | None:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        errors.append(f"{section}: {text.splitlines()[-1][:300]}")
        return None


def read_status(target: Target, output: str, certificate: dict[str, Any] | None) -> Status:
    """A Status from the status script's output."""
    sections = parse_sections(output)
    status = Status(target.name, target.url, certificate=certificate)
    tasks, other = json_lines(sections.get("tasks", ""))
    if other:
        status.errors.append(f"{MODEL_SERVICE} tasks: {other[-1][:300]}")
    mode = json_document(sections.get("desired", ""), "service", status.errors) or {}
    status.desired = (mode.get("Replicated") or {}).get("Replicas")
    answers = replica_answers(sections.get("replicas", ""))
    monitoring = json_document(sections.get("monitoring", ""), "monitoring (Prometheus)", status.errors) or {}
    scraped = scraped_versions(sections.get("addresses", ""), monitoring.get("versions") or {})
    for task in tasks:
        answer = answers.get(task.get("ID", ""))
        replica = Replica(node=task.get("Node", ""), state=task.get("CurrentState", ""))
        if answer is not None:
            replica.version = answer.get("version")
            replica.metrics = answer.get("metrics") or {}
            replica.error = answer.get("error")
        else:  # on another node: what Prometheus last scraped from it
            replica.version = scraped.get(task.get("ID", ""))
        status.replicas.append(replica)
    status.errors += [f"replica on {r.node}: {r.error}" for r in status.replicas if r.error]
    versions = json_document(sections.get("versions", ""), "versions", status.errors)
    if versions:
        status.current_version = versions.get("current")
        status.versions = len(versions.get("versions", []))
        history = versions.get("history") or []
        status.last_retrain = history[-1] if history else None
    status.drift = json_document(sections.get("drift", ""), "drift", status.errors)
    status.backup = json_document(sections.get("backup", ""), "backup", status.errors)
    status.alerts, status.edge = monitoring.get("alerts"), monitoring.get("edge")
    fields = sections.get("disk", "").split()
    if len(fields) >= 4 and fields[1].isdigit() and fields[3].isdigit():
        status.disk = {"size": int(fields[1]), "free": int(fields[3])}
    elif fields:
        status.errors.append(f"disk: {sections['disk'][:300]}")
    return status


def problems(status: Status, now: float | None = None) -> list[str]:
    """What is wrong, each naming the part; empty when healthy."""
    now = time.time() if now is None else now
    found: list[str] = []
    running = [r for r in status.replicas if r.state.lower().startswith("running")]
    if status.desired is None:
        found.append(f"the {MODEL_SERVICE} service is missing")
    elif len(running) < status.desired:
        not_running = [f"{r.node}: {r.state}" for r in status.replicas if r not in running]
        found.append(
            f"replicas: {len(running)}/{status.desired} running"
            + (f" ({'; '.join(not_running)})" if not_running else "")
        )
    stale = sorted({r.version for r in running if r.version and r.version != status.current_version})
    if status.current_version is None:
        found.append("no model version is being served")
    elif stale:
        found.append(f"replicas still serve {', '.join(stale)}, not {status.current_version}")
    certificate = status.certificate or {}
    if "error" in certificate:
        found.append(f"certificate: {certificate['error']}")
    elif certificate and certificate["days_left"] < CERTIFICATE_MIN_DAYS:
        found.append(f"certificate expires in {certificate['days_left']} days ({certificate['not_after']})")
    if status.last_retrain and status.last_retrain.get("outcome") == "failed":
        found.append(f"last retrain failed: {status.last_retrain.get('reason', '')}")
    backup = status.backup or {}
    success, failure = backup.get("last_success_unixtime") or 0, backup.get("last_failure_unixtime") or 0
    if failure > success:
        found.append(f"last backup failed at {stamp(failure)}")
    elif success and now - success > BACKUP_MAX_AGE_S:
        found.append(f"no successful backup for {(now - success) / 3600:.0f} h (last {stamp(success)})")
    if status.disk and status.disk["free"] < DISK_MIN_FREE * status.disk["size"]:
        found.append(f"data volume: {status.disk['free'] / status.disk['size']:.0%} free")
    drift = status.drift or {}
    if drift.get("window", 0) >= DRIFT_MIN_WINDOW:
        drifting = sorted(name for name, psi in drift.get("psi", {}).items() if psi > DRIFT_MAX_PSI)
        if drifting:
            found.append(f"drift: PSI above {DRIFT_MAX_PSI} for {', '.join(drifting)}")
    edge = status.edge or {}
    requests, errors = edge.get("requests_1h", 0), edge.get("errors_5xx_1h", 0)
    if requests >= EDGE_MIN_REQUESTS and errors > EDGE_MAX_5XX * requests:
        found.append(f"edge: {errors / requests:.1%} of the last hour's {requests} requests answered 5xx")
    found += [f"alert {a['name']} firing since {a['since'][:19]}: {a['summary']}" for a in status.alerts or []]
    return found + status.errors


def stamp(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M UTC")


def edge_certificate(target: Target, timeout: float = 10) -> dict[str, Any]:
    """The certificate the edge presents for the stack's name: issuer, expiry, days left (not verified here: the
    point is to see it, even when it is the wrong one)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((target.edge_address, target.edge_port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=target.domain) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except OSError as exc:
        return {"error": f"no TLS answer from {target.edge_address}:{target.edge_port}: {exc}"}
    certificate = x509.load_der_x509_certificate(der)
    issuer = certificate.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    not_after = certificate.not_valid_after_utc
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )
    found: dict[str, Any] = {
        "issuer": issuer[0].value if issuer else certificate.issuer.rfc4514_string(),
        "not_after": not_after.isoformat(timespec="seconds"),
        "days_left": (not_after - datetime.now(UTC)).days,
    }
    if target.domain not in names:
        found["error"] = f"the certificate is for {', '.join(names)}, not {target.domain}"
    return found


def collect(target: Target) -> Status:
    """Ask the stack (one round trip to the manager) and its edge."""
    result = target.run(
        ["sh", "-s", "--", target.data_root, MODEL_SERVICE, str(MODEL_PORT), f"{PROMETHEUS_SERVICE}:{PROMETHEUS_PORT}"],
        input=STATUS_SCRIPT.read_bytes(),
    )
    status = read_status(target, result.stdout.decode(errors="replace"), edge_certificate(target))
    if result.returncode != 0 and not result.stdout:  # ssh's own failure: its last line says why
        said = result.stderr.decode(errors="replace").strip().splitlines() or [f"exit {result.returncode}"]
        status.errors.append(f"{target.name}: {said[-1][:300]}")
    return status
