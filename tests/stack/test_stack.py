"""The whole stack for real on the local Docker engine in swarm mode: Traefik gets a certificate from Pebble over
ACME and balances over the model service's replicas. Under continuous load (8 clients, single and batch
predictions, bounded), rolling updates, crashes, promotions, rollbacks and a broken image cost no request.

These run in CI (never skipped there); elsewhere they skip loudly without a Docker engine.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import gevent.ssl
import numpy as np
import pandas as pd
import pytest
import tritonclient.http as triton
from docker.types import Mount

from app.project import PARQUET_READER
from infra.local import stack as local
from infra.local.engine import (
    HASH_LABEL,
    RolloutFailed,
    apply_service,
    ensure_network,
    ensure_swarm,
    run_container,
    running_tasks,
)
from infra.local.images import BuildError
from infra.local.pebble import PEBBLE_CONTAINER, PEBBLE_DIRECTORY, fetch_pebble_root, pebble_files, run_pebble
from infra.ops.smoke import wait_healthy
from infra.spec.acme import LETSENCRYPT_PRODUCTION
from infra.spec.docker_api import DOCKER_API_CONTAINER, DOCKER_API_VOLUME, PROXY_SOCKET, PROXY_SOCKET_DIR, SOCKET
from infra.spec.monitoring import ALERTMANAGER_SERVICE, NODE_EXPORTER_SERVICE, PROMETHEUS_SERVICE
from infra.spec.stack import (
    MODEL_SERVICE,
    MODEL_UID,
    NETWORK,
    SECRETS,
    TRAEFIK_CONTAINER,
    TRAEFIK_UID,
    build_stack,
)
from infra.spec.traefik import ACME_CA_BUNDLE_PATH, WEB_PORT, WEBSECURE_PORT, acme_storage
from testbed.monitoring import WebhookReceiver, prometheus_query, targets_by_job, webhook_receiver
from testbed.stack import (
    COUNT_PREDICTIONS,
    TIMINGS,
    app_command,
    docker_engine,
    free_port,
    fresh_observations,
    https,
    pebble_orders,
    peer_certificate,
    pin_holdout_seed,
    promote,
    tasks,
    tls_context,
    wait_until,
)
from tests.support.load import WATCHING_RATE, Load, LoadReport
from tests.support.peers import kserve_infer
from tests.support.program import parse_go_duration
from tests.support.pulumi_harness import VALID_CONFIG, run_program
from tests.support.service import FEATURES, record

pytestmark = pytest.mark.stack
NS = 1_000_000_000
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def alert_receiver() -> Iterator[WebhookReceiver]:
    """Where the stack's Alertmanager sends: a webhook receiver of ours on the overlay, up before the stack."""
    client = docker_engine()
    ensure_swarm(client)
    ensure_network(client, NETWORK)
    with webhook_receiver(client, NETWORK) as receiver:
        yield receiver


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, alert_receiver: WebhookReceiver) -> Iterator[local.LocalStack]:
    docker_engine()
    local.down(quiet=True)  # names are the production ones: a running `make local-up` is stopped (data kept)
    root = tmp_path_factory.mktemp("stack")
    options = replace(
        local.LocalOptions.isolated(root, free_port(), free_port()),
        # Test-short monitoring: scrapes every 2 s, alerts after 4 s, to the receiver.
        alert_webhook_url=alert_receiver.url,
        monitoring_interval_s=2,
        alert_wait="4s",
    )
    pin_holdout_seed(options.data_root)
    try:
        started = local.up(options, quiet=True)
        timing = started.timings
        TIMINGS.append(
            f"local stack: first verified HTTPS 200 {timing['stack_s']} s after images were ready; "
            f"{timing['total_s']} s including {timing['images_s']} s to build or find the images"
        )
        yield started
    finally:
        local.down(options, delete_data=True, quiet=True)


def load(stack: local.LocalStack, rate: float | None = WATCHING_RATE, **kwargs) -> Load:
    return Load(stack.options.domain, stack.options.https_port, str(stack.ca_root), rate=rate, **kwargs)


def record_load(what: str, report: LoadReport, event: tuple[float, float] | None = None) -> None:
    """Zero failed requests, and with an ``event`` (when it began, when the service was whole again) proof that the
    load covered it: requests answered before, during and after."""
    during = f"; {report.covers(*event)} answered during the event" if event else ""
    TIMINGS.append(f"{what}: {report.summary()}{during}")
    assert report.outcomes, "the load generator sent nothing"
    assert not report.failed, f"{what}: {report.summary()}; first failures: {report.failed[:5]}"


def record_switch(what: str, old: LoadReport, new: LoadReport) -> None:
    """A switch to another schema: once one request valid under the new schema was answered, none sent after it
    fails, and none valid under the old schema failed before then (they may only fail once no old replica is left)."""
    answered = sorted(o.at for o in new.outcomes if o.status == 200)
    assert answered, f"{what}: no request of the new schema was answered: {new.summary()}"
    first = answered[0]
    new_failed = [o for o in new.failed if o.at - o.seconds > first]  # sent after the first answer came back
    old_failed = [o for o in old.failed if o.at < first]
    handed = sum(bool(o.via) for o in old.outcomes + new.outcomes)
    TIMINGS.append(
        f"{what}: new schema {new.summary()}, first answered {first - new.started_at:.0f} s in, then "
        f"{len(new_failed)} failed; old schema {old.summary()}, {len(old_failed)} failed before that; "
        f"{handed} answered by a replica of the other generation"
    )
    assert not new_failed, f"{what}: new-schema requests failed after the switch began: {new_failed[:5]}"
    assert not old_failed, f"{what}: old-schema requests failed before the new model served: {old_failed[:5]}"


def serial(stack: local.LocalStack) -> str:
    return peer_certificate(stack)["serialNumber"]


def versions_by_replica(stack: local.LocalStack, calls: int = 12) -> dict[str, str]:
    """Which version each replica serves, as seen through Traefik (which balances the calls over them)."""
    seen: dict[str, str] = {}
    for _ in range(calls):
        status, _, body = https(stack, "GET", "/model")
        assert status == 200, body
        answer = json.loads(body)
        seen[answer["served_by"]] = answer["version"]
    return seen


def variant_image(client, base: str, label: str, dockerfile_tail: str = "") -> str:
    """A new image from the current one (a label, and optionally a change), as a code change would give."""
    tag = f"{base.rsplit(':', 1)[0]}:{base.rsplit(':', 1)[1]}-{label}"
    with tempfile.TemporaryDirectory() as context:
        (Path(context) / "Dockerfile").write_text(f"FROM {base}\nLABEL mlapi.test.variant={label}\n{dockerfile_tail}")
        subprocess.run(
            ["docker", "build", "--quiet", "-t", tag, context],
            check=True,
            capture_output=True,
            env={"DOCKER_BUILDKIT": "0", "PATH": os.environ["PATH"]},
        )
    return tag


def deploy_model(client, stack: local.LocalStack, image: str):
    return deploy_model_spec(client, stack, replace(stack.spec.model, image=image))


def deploy_model_spec(client, stack: local.LocalStack, spec):
    secrets = {
        base: next((s.id, s.name) for s in client.secrets.list() if s.name.startswith(f"{base}-")) for base in SECRETS
    }
    return apply_service(client, spec, stack.spec.network, secrets, timeout=300)


# -- the edge -------------------------------------------------------------------------------------------------------
def test_https_chain_verifies_against_pebble_and_names_the_domain(stack: local.LocalStack) -> None:
    certificate = peer_certificate(stack)  # raises if the chain does not verify against Pebble's root
    assert ("DNS", stack.options.domain) in certificate["subjectAltName"]
    assert "Pebble" in str(certificate["issuer"])
    with pytest.raises(ssl.SSLCertVerificationError):  # and not against the system's roots: a real chain check
        context = ssl.create_default_context()
        with socket.create_connection(("127.0.0.1", stack.options.https_port), timeout=10) as raw:
            context.wrap_socket(raw, server_hostname=stack.options.domain)


def test_the_local_ca_keys_are_private(stack: local.LocalStack) -> None:
    pebble_dir = stack.options.state_dir / "pebble"
    for name in ("ca.key", "key.pem"):
        assert oct((pebble_dir / name).stat().st_mode & 0o777) == "0o600", name


def test_http_redirects_to_https_keeping_path_and_query(stack: local.LocalStack) -> None:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", stack.options.http_port, timeout=10)
    connection.request("GET", "/predict?confidence=0.9&x=a%20b", headers={"Host": stack.options.domain})
    response = connection.getresponse()
    assert response.status == 301
    # To the port clients reach: 8443 locally, and no port on the VM (443; tests/standin/test_standin.py)
    target = f"https://{stack.options.domain}:{stack.options.https_port}/predict?confidence=0.9&x=a%20b"
    assert response.getheader("Location") == target
    status, headers, _ = https(stack, "GET", "/health")
    assert status == 200
    assert headers["strict-transport-security"] == "max-age=31536000; includeSubDomains"


def test_predict_and_docs_through_traefik(stack: local.LocalStack) -> None:
    status, headers, body = https(stack, "POST", "/predict", {"features": record(), "confidence": 0.95})
    assert status == 200, body
    answer = json.loads(body)
    assert answer["interval"]["lower"] < answer["prediction"] < answer["interval"]["upper"]
    assert answer["interval"]["confidence"] == 0.95
    assert re.fullmatch(r"v\d{4}", answer["model_version"])
    assert headers["strict-transport-security"].startswith("max-age=31536000")  # the predict router has it too
    status, _, body = https(stack, "GET", "/docs")
    assert status == 200 and b"swagger-ui" in body
    status, _, body = https(stack, "GET", "/openapi.json")
    assert set(json.loads(body)["components"]["schemas"]["Features"]["required"]) == set(FEATURES)
    status, _, body = https(stack, "POST", "/predict", {"features": record(bmi="x")})
    assert status == 422 and b"bmi" in body


LOAD_EVERY_SHARED_OBJECT = """
import ctypes, pathlib, sys
failed = []
for path in sorted(pathlib.Path("/opt/venv").rglob("*.so*")):
    try:
        ctypes.CDLL(str(path))
    except OSError as error:
        failed.append(str(error))
print(len(failed), "of", len(list(pathlib.Path("/opt/venv").rglob("*.so*"))), "failed")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_shared_object_in_the_model_image_loads(stack: local.LocalStack) -> None:
    """The image's build strips the extension modules' symbols (app/Dockerfile), but not the wheels' bundled
    libraries, which a strip breaks: the dynamic loader must accept every .so the venv holds."""
    output = docker_engine().containers.run(
        stack.inputs.model_image, ["python", "-c", LOAD_EVERY_SHARED_OBJECT], entrypoint=[], remove=True
    )
    assert output.startswith(b"0 of "), output


def test_two_replicas_serve_behind_traefik(stack: local.LocalStack) -> None:
    client = docker_engine()
    assert len(running_tasks(client, MODEL_SERVICE)) == 2
    assert len(versions_by_replica(stack)) == 2, "Traefik must balance over both replicas"
    for task in tasks(client):  # the admin token is a swarm secret, not an env var visible in docker inspect
        assert not any(e.startswith("MLAPI_ADMIN_TOKEN=") for e in task.attrs["Config"]["Env"])
        assert task.exec_run(["test", "-s", "/run/secrets/admin_token"]).exit_code == 0


def logged_predictions(client) -> int:
    return int(tasks(client)[0].exec_run(["python", "-c", COUNT_PREDICTIONS]).output.decode().strip())


def test_two_replicas_writing_one_prediction_log_lose_nothing(stack: local.LocalStack) -> None:
    """Both replicas append to the same SQLite file (WAL, busy timeout): every row served is logged, none dropped."""
    client = docker_engine()
    before = logged_predictions(client)
    with load(stack, rate=None, max_seconds=10) as traffic:  # unpaced: as many concurrent writes as they take
        time.sleep(10)
    record_load("two replicas logging to one SQLite file", traffic.report)
    served = sum(20 if o.path == "/predict/batch" else 1 for o in traffic.report.outcomes)
    wait_until(lambda: logged_predictions(client) - before >= served, 30, f"{served} rows in the prediction log")
    assert logged_predictions(client) - before == served
    for task in tasks(client):  # and no replica counted a dropped record
        metrics = task.exec_run(
            [
                "python",
                "-c",
                "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/metrics').read().decode())",
            ]
        ).output.decode()
        assert "mlapi_prediction_log_dropped_total 0.0" in metrics
    TIMINGS.append(f"prediction log: {served} rows served by 2 replicas in 10 s, {served} logged, 0 dropped")


def test_private_routes_are_not_public_but_the_host_command_works(stack: local.LocalStack) -> None:
    token = (stack.options.state_dir / "admin-token").read_text().strip()
    private = (("POST", "/admin/retrain"), ("GET", "/admin/versions"), ("POST", "/admin/rollback"), ("GET", "/metrics"))
    for method, path in private:
        status, _, _ = https(stack, method, path, headers={"Authorization": f"Bearer {token}"})
        assert status == 404, f"{path} must not be routed by the public proxy"
    exposition = app_command(stack, "metrics")
    assert exposition.returncode == 0 and "mlapi_predictions_total" in exposition.stdout  # the host reads them
    assert "/usr/local/bin/mlapi-app retrain" in stack.spec.retrain_cron
    result = app_command(stack, "retrain")
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["outcome"] in {"promoted", "rejected"} and "holdout RMSE" in outcome["reason"]
    versions = app_command(stack, "versions")
    assert versions.returncode == 0 and json.loads(versions.stdout)["current"]


def test_the_edge_refuses_large_bodies_and_sends_security_headers(stack: local.LocalStack) -> None:
    import http.client

    context = tls_context(stack)
    raw = socket.create_connection(("127.0.0.1", stack.options.https_port), timeout=30)
    connection = http.client.HTTPSConnection(stack.options.domain, stack.options.https_port, context=context)
    connection.sock = context.wrap_socket(raw, server_hostname=stack.options.domain)
    # Declared just over 4 MiB: Traefik answers 413 from the header alone, before a byte of the body is read (a
    # client that went on sending would see the connection closed under it).
    connection.putrequest("POST", "/predict/batch")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(4 * 1024 * 1024 + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    connection.close()
    status, headers, _ = https(stack, "GET", "/health")
    assert status == 200
    assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["content-security-policy"] == "frame-ancestors 'none'"
    assert "server" not in headers  # no banner from the app (uvicorn's is off)


# testssl.sh findings that come from the local CA (Pebble) or the local name, not from the edge's configuration.
LOCAL_CA_ARTEFACTS = {
    "cert_revocation": "Pebble's certificates name neither a CRL nor an OCSP responder (Let's Encrypt's do)",
    "cert_validityPeriod": "Pebble issues certificates valid for about 5 years (Let's Encrypt: 90 days or less)",
    "cert_serialNumberLen": "Pebble draws serials below 2^63: one in 128 has a leading zero byte, 7 bytes long",
}
# Let's Encrypt's serials are 18 bytes; a serial shorter than Pebble's 7 is still a finding.
PEBBLE_SHORT_SERIAL = "7 is not enough entropy"


def local_ca_artefact(finding: dict[str, str]) -> bool:
    """Whether a testssl.sh finding is one of the local CA's; the serial length only at Pebble's 7 bytes."""
    if finding["id"] == "cert_serialNumberLen":
        return finding["finding"] == PEBBLE_SHORT_SERIAL
    return finding["id"] in LOCAL_CA_ARTEFACTS


def test_testssl_finds_nothing_but_local_ca_artefacts(stack: local.LocalStack, tmp_path: Path) -> None:
    """testssl.sh (Debian) against the edge: TLS 1.2/1.3 with AEAD suites only, an EC P-256 certificate, the
    headers. Any finding rated LOW or worse fails, except the listed artefacts of the local CA and name."""
    report = tmp_path / "testssl.json"
    result = subprocess.run(
        [
            "testssl",
            "--quiet",
            "--color",
            "0",
            "--warnings",
            "off",
            "--nodns",
            "none",
            "--ip",
            "127.0.0.1",
            "--add-ca",
            str(stack.ca_root),
            "--jsonfile",
            str(report),
            "-p",
            "-s",
            "-f",
            "-S",
            "-U",
            "-h",
            f"{stack.options.domain}:{stack.options.https_port}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    findings = json.loads(report.read_text())
    assert findings, result.stdout[-3000:] + result.stderr[-2000:]
    reported = [f for f in findings if f.get("severity") in {"LOW", "MEDIUM", "HIGH", "CRITICAL"}]
    unexpected = [f for f in reported if not local_ca_artefact(f)]
    artefacts = sorted({f["id"] for f in reported})
    TIMINGS.append(f"testssl.sh: {len(reported)} findings LOW or worse, all local-CA artefacts: {artefacts}")
    assert not unexpected, json.dumps(unexpected, indent=1)
    by_id = {f["id"]: f["finding"] for f in findings}
    assert by_id.get("TLS1_2") == "offered" and by_id.get("TLS1_3", "").startswith("offered")
    assert by_id.get("TLS1", "").startswith("not offered") and by_id.get("TLS1_1", "").startswith("not offered")
    assert "EC" in by_id.get("cert_keySize", "") and "256" in by_id.get("cert_keySize", "")


def limited(stack: local.LocalStack, **middleware: str) -> dict[str, str]:
    """The model service's labels with some of the prediction route's limits tightened."""
    prefix = "traefik.http.middlewares"
    return {**stack.spec.model.labels, **{f"{prefix}.{key}": value for key, value in middleware.items()}}


def restore_limits(client, stack: local.LocalStack) -> None:
    """Back to the stack's own labels, and wait until Traefik applies them: it reloads labels asynchronously, and the
    next test's load (8 clients from one address) would otherwise meet the tightened limits."""
    deploy_model_spec(client, stack, stack.spec.model)
    batch = {"records": [record() for _ in range(2_000)]}  # slow enough that 8 of them are in flight together

    def accepted_at_once() -> bool:
        with ThreadPoolExecutor(8) as pool:
            return all(s == 200 for s in pool.map(lambda _: https(stack, "POST", "/predict/batch", batch)[0], range(8)))

    wait_until(lambda: accepted_at_once() and accepted_at_once(), 60, "the stack's own limits")


def test_a_client_over_its_rate_gets_429_in_proportion_to_the_rate_it_achieved(stack: local.LocalStack) -> None:
    """The production rate limit's labels, tightened on the running service (labels change without new tasks): a
    burst from one address is cut to what the bucket allows for the rate the test actually reached."""
    client = docker_engine()
    average = burst = 5
    tight = limited(
        stack, **{"mlapi-ratelimit.ratelimit.average": str(average), "mlapi-ratelimit.ratelimit.burst": str(burst)}
    )
    deploy_model_spec(client, stack, replace(stack.spec.model, labels=tight))
    try:
        wait_until(lambda: 429 in {https(stack, "GET", "/health")[0] for _ in range(15)}, 30, "the tight limit")
        # The probes emptied the bucket: let it refill (two tokens at once, asked every half second) before the burst.
        wait_until(lambda: [https(stack, "GET", "/health")[0] for _ in range(2)] == [200, 200], 30, "a refill", 0.5)
        sent = 40
        with ThreadPoolExecutor(8) as pool:
            started = time.monotonic()
            statuses = list(pool.map(lambda _: https(stack, "GET", "/health")[0], range(sent)))
            elapsed = time.monotonic() - started
    finally:
        restore_limits(client, stack)
    achieved = sent / elapsed
    assert achieved > 2 * average, f"{achieved:.1f} req/s cannot show a limit of {average}/s"
    allowed = burst + average * elapsed  # a full bucket at most, plus what refills while the burst runs
    TIMINGS.append(f"rate limit {average}/s: {sent} requests at {achieved:.0f}/s, {statuses.count(200)} allowed")
    assert set(statuses) <= {200, 429}, statuses
    assert 1 <= statuses.count(200) <= allowed + 1, (statuses.count(200), allowed)


SERVED_BATCHES = (
    "import sqlite3, sys; print(sqlite3.connect('/data/predictions.sqlite3').execute("
    "'SELECT ts, max(latency_ms) * count(*) / 1000.0 FROM predictions WHERE ts BETWEEN ? AND ? GROUP BY ts "
    "HAVING count(*) = 10000', (float(sys.argv[1]), float(sys.argv[2]))).fetchall())"
)


def served_batches(since: float, until: float, expected: int) -> list[tuple[float, float]] | None:
    """(began, ended) in a replica of each 10,000-row batch logged between ``since`` and ``until`` (a batch's rows
    share the time it ended and its per-row latency); None until ``expected`` of them are in the log."""
    replica = tasks(docker_engine())[0]
    found = replica.exec_run(["python", "-c", SERVED_BATCHES, str(since), str(until)])
    rows = ast.literal_eval(found.output.decode()) if found.exit_code == 0 else []
    return sorted((ended - took, ended) for ended, took in rows) if len(rows) >= expected else None


def test_a_client_over_its_concurrency_gets_429_and_within_it_none(stack: local.LocalStack) -> None:
    """The in-flight limit, exercised for real: slow requests (10,000-row batches) from one address, more at once
    than the limit allows, get 429s; as many at once as it allows, none."""
    client = docker_engine()
    amount = 2
    tight = limited(
        stack,
        **{
            "mlapi-inflight.inflightreq.amount": str(amount),
            "mlapi-ratelimit.ratelimit.average": "1000",
            "mlapi-ratelimit.ratelimit.burst": "1000",
        },
    )
    batch = {"records": [record(age=0.001 * (i % 50)) for i in range(10_000)]}

    def slow(_: int) -> tuple[int, float, float]:
        began = time.monotonic()
        status = https(stack, "POST", "/predict/batch", batch, timeout=120)[0]
        return status, began, time.monotonic()

    def at_once(clients: int, requests: int) -> list[tuple[int, float, float]]:
        with ThreadPoolExecutor(clients) as pool:
            return list(pool.map(slow, range(requests)))

    deploy_model_spec(client, stack, replace(stack.spec.model, labels=tight))
    try:
        wait_until(lambda: 429 in {status for status, _, _ in at_once(6, 6)}, 60, "the tight limit")
        since = time.time()
        beyond = at_once(8, 8)
        until = time.time()
        within = at_once(amount, 3 * amount)
    finally:
        restore_limits(client, stack)
    statuses = [status for status, _, _ in beyond]
    assert set(statuses) <= {200, 429} and statuses.count(429) >= 1 and statuses.count(200) >= amount, statuses
    # Counted where the limit holds, not from this client's clock (its intervals also hold the TLS handshake and the
    # bodies' transfer, which stretch under load): each served batch's time in a replica, from the prediction log.
    deadline, served = time.monotonic() + 30, None
    while served is None and time.monotonic() < deadline:  # the log writes in the background
        served = served_batches(since, until, statuses.count(200)) or time.sleep(0.5)
    assert served, f"the {statuses.count(200)} served batches are not in the prediction log"
    overlapping = max(sum(b <= t < e for b, e in served) for t, _ in served)
    assert overlapping <= amount, f"{overlapping} of one client's batches were in the replicas at once"
    assert [status for status, _, _ in within] == [200] * (3 * amount)
    TIMINGS.append(f"in-flight limit {amount}: 8 at once -> {statuses.count(429)} refused; {amount} at once -> none")


# -- zero failed requests -----------------------------------------------------------------------------------------
def test_rolling_update_to_a_new_image_fails_no_request(stack: local.LocalStack) -> None:
    client = docker_engine()
    new_image = variant_image(client, stack.spec.model.image, "rolling")
    try:
        with load(stack, max_seconds=400) as traffic:  # the rollout may take up to 300 s
            traffic.wait_for_answers_after(traffic.report.started_at)
            began = time.monotonic()
            rollout = deploy_model(client, stack, new_image)
            converged = time.monotonic()
            traffic.wait_for_answers_after(converged)
        record_load(f"rolling update ({rollout.action} in {rollout.seconds} s)", traffic.report, (began, converged))
        assert rollout.action == "updated"
        running = running_tasks(client, MODEL_SERVICE)
        assert len(running) == 2
        assert all(t["Spec"]["ContainerSpec"]["Image"] == new_image for t in running)
    finally:  # back to the stack's image for the tests after this one, whatever happened here
        deploy_model(client, stack, stack.spec.model.image)


def test_a_crashed_replica_fails_no_request_and_swarm_replaces_it(stack: local.LocalStack) -> None:
    client = docker_engine()
    for crash in ("kill -9 of the main process", "docker kill of the task"):
        victim = tasks(client)[0]
        with load(stack, max_seconds=180) as traffic:  # the replacement may take up to 120 s
            traffic.wait_for_answers_after(traffic.report.started_at)
            started = time.monotonic()
            if crash.startswith("kill -9"):
                # What an OOM kill or a segfault looks like: uvicorn dies (tini, PID 1 in the task, then exits).
                pid = next(int(p[1]) for p in victim.top()["Processes"] if "app serve" in p[-1])
                os.kill(pid, signal.SIGKILL)
            else:
                victim.kill()

            def replaced(victim_id: str = victim.id) -> bool:
                running = running_tasks(client, MODEL_SERVICE)
                ids = {t["Status"].get("ContainerStatus", {}).get("ContainerID") for t in running}
                return len(running) == 2 and victim_id not in ids

            wait_until(replaced, 120, f"swarm to replace the task after {crash}")
            converged = time.monotonic()
            replaced_s = converged - started
            traffic.wait_for_answers_after(converged)
        record_load(f"{crash} (replaced after {replaced_s:.1f} s)", traffic.report, (started, converged))


def test_promotion_and_rollback_reach_every_replica_and_fail_no_request(stack: local.LocalStack) -> None:
    status, _, _ = https(stack, "POST", "/observations", {"observations": fresh_observations(3, seed=99)})
    assert status == 401  # ground truth needs the ingest token
    before = set(versions_by_replica(stack).values())
    assert len(before) == 1
    with load(stack) as traffic:
        traffic.wait_for_answers_after(traffic.report.started_at)
        began = time.monotonic()
        outcome = promote(stack)
        promoted = outcome["current_version"]
        started = time.monotonic()
        wait_until(lambda: set(versions_by_replica(stack).values()) == {promoted}, 15, f"all replicas on {promoted}")
        promotion_s = time.monotonic() - started
        rolled = app_command(stack, "rollback", *before)
        assert rolled.returncode == 0, rolled.stderr
        started = time.monotonic()
        wait_until(lambda: set(versions_by_replica(stack).values()) == before, 15, f"all replicas back on {before}")
        converged = time.monotonic()
        rollback_s = converged - started
        traffic.wait_for_answers_after(converged)
    record_load(
        f"promotion to {promoted} (all replicas after {promotion_s:.1f} s) and rollback "
        f"(all replicas after {rollback_s:.1f} s)",
        traffic.report,
        (began, converged),
    )


def test_a_broken_image_is_rolled_back_and_the_old_version_serves(stack: local.LocalStack) -> None:
    """The new version never turns healthy (it hangs at start): swarm rolls back, the update reports why, and the
    old version serves throughout."""
    client = docker_engine()
    broken = variant_image(
        client,
        stack.spec.model.image,
        "broken",
        "USER root\nRUN echo 'import time; time.sleep(10 ** 6)' > /opt/mlapi/app/main.py\nUSER 10001:10001\n",
    )
    with load(stack, max_seconds=400) as traffic:
        traffic.wait_for_answers_after(traffic.report.started_at)
        started = time.monotonic()
        with pytest.raises(RolloutFailed) as failed:
            deploy_model(client, stack, broken)
        converged = time.monotonic()
        reported_s = converged - started
        traffic.wait_for_answers_after(converged)
    record_load(f"broken image rolled back (reported after {reported_s:.0f} s)", traffic.report, (started, converged))
    message = str(failed.value)
    assert "rollback completed" in message and "previous version keeps serving" in message
    assert "unhealthy" in message, message
    running = running_tasks(client, MODEL_SERVICE)
    assert len(running) == 2 and all(t["Spec"]["ContainerSpec"]["Image"] == stack.spec.model.image for t in running)


def test_traefik_restart_reuses_the_stored_certificate(stack: local.LocalStack) -> None:
    client = docker_engine()
    before_serial, before_orders = serial(stack), pebble_orders(client)
    store = stack.options.data_root / "traefik" / acme_storage(stack.inputs.ca_server).rsplit("/", 1)[1]
    assert store.stat().st_size > 0
    client.containers.get(TRAEFIK_CONTAINER).restart(timeout=10)
    ok, message = wait_healthy(
        f"{stack.url}/health", attempts=120, delay=0.5, cacert=str(stack.ca_root), connect_to="127.0.0.1"
    )
    assert ok, message
    assert serial(stack) == before_serial
    assert pebble_orders(client) == before_orders, "a restart must not place a new ACME order"


def test_switching_the_ca_serves_a_certificate_from_the_new_ca(stack: local.LocalStack, tmp_path: Path) -> None:
    """Like acmeStaging true → false: another CA, so another certificate store; the old certificate is not kept."""
    client = docker_engine()
    second = pebble_files(tmp_path, (WEB_PORT, WEBSECURE_PORT), names=("pebble-second",))
    bundle = tmp_path / "both-listener-cas.pem"  # Traefik must trust the new CA's API, as it trusts Let's Encrypt's
    bundle.write_bytes((stack.options.state_dir / "pebble" / "ca.pem").read_bytes() + (second / "ca.pem").read_bytes())
    run_pebble(
        client,
        "mlapi-pebble:" + client.containers.get(PEBBLE_CONTAINER).image.tags[0].split(":")[1],
        second,
        stack.spec.network,
        name="mlapi-pebble-second",
        alias="pebble-second",
    )
    try:
        second_root = fetch_pebble_root(client, second, tmp_path / "second-root.pem", name="mlapi-pebble-second")
        switched = stack.inputs.model_copy(
            update={"acme_ca_server": "https://pebble-second:14000/dir", "acme_ca_bundle": str(bundle)}
        )
        assert acme_storage(switched.ca_server) != acme_storage(stack.inputs.ca_server)
        run_container(client, build_stack(switched).traefik)
        ok, message = wait_healthy(
            f"{stack.url}/health", attempts=120, delay=0.5, cacert=str(second_root), connect_to="127.0.0.1"
        )
        assert ok, f"not served with a certificate from the new CA: {message}"
        assert pebble_orders(client, "mlapi-pebble-second") >= 1
    finally:
        run_container(client, stack.spec.traefik)  # back to the first CA, its own store
        client.containers.get("mlapi-pebble-second").remove(force=True)
    ok, message = wait_healthy(
        f"{stack.url}/health", attempts=120, delay=0.5, cacert=str(stack.ca_root), connect_to="127.0.0.1"
    )
    assert ok, message


# -- one spec -----------------------------------------------------------------------------------------------------
CA_FLAG = "--certificatesresolvers.letsencrypt.acme.caserver="
STORE_FLAG = "--certificatesresolvers.letsencrypt.acme.storage="
TRUST_FLAG = f"--certificatesresolvers.letsencrypt.acme.cacertificates={ACME_CA_BUNDLE_PATH}"
REDIRECT_FLAG = "--entrypoints.web.http.redirections.entrypoint.to=:"  # to the host's HTTPS port: 443, or local's


def without_local_flags(flags: list[str]) -> list[str]:
    """Traefik's flags minus the documented local differences: which ACME CA (and so its store), trusting it, and
    the HTTPS port the redirect names."""
    return [f for f in flags if not f.startswith((CA_FLAG, STORE_FLAG, REDIRECT_FLAG)) and f != TRUST_FLAG]


def assert_runs_as_declared(running: dict, declared: dict, data_root: str, local_mounts: tuple = ()) -> None:
    """A running container has the Pulumi inputs' mounts, health check, restart policy, user, confinement, ports
    and networks (``local_mounts``: the documented local extras)."""
    assert running["Name"] == f"/{declared['name']}"
    assert running["Config"]["User"] == declared["user"]
    mounts = sorted((m.get("Name") or m["Source"], m["Destination"], not m["RW"]) for m in running["Mounts"])
    declared_mounts = sorted(
        [(m["source"].replace("/srv/mlapi", data_root), m["target"], m["readOnly"]) for m in declared["mounts"]]
        + list(local_mounts)
    )
    assert mounts == declared_mounts
    check, declared_check = running["Config"].get("Healthcheck"), declared.get("healthcheck")
    if declared_check is None:
        assert check is None
    else:
        assert check["Test"] == declared_check["tests"]
        assert (check["Interval"], check["Timeout"], check["StartPeriod"], check["Retries"]) == (
            parse_go_duration(declared_check["interval"]) * NS,
            parse_go_duration(declared_check["timeout"]) * NS,
            parse_go_duration(declared_check["startPeriod"]) * NS,
            declared_check["retries"],
        )
    host = running["HostConfig"]
    assert host["RestartPolicy"]["Name"] == declared["restart"]
    assert host["CapDrop"] == declared["capabilities"]["drops"]
    assert (host["CapAdd"] or []) == declared["capabilities"]["adds"]
    assert host["ReadonlyRootfs"] is declared["readOnly"] is True
    assert host["Tmpfs"] == declared["tmpfs"]
    assert host["Memory"] == declared["memory"] * 2**20
    assert host["SecurityOpt"] == declared["securityOpts"]
    networks = running["NetworkSettings"]["Networks"]
    if declared.get("networkMode") == "none":
        assert host["NetworkMode"] == "none" and list(networks) == ["none"]
    else:
        assert list(networks) == [n["name"] for n in declared["networksAdvanced"]]


def test_local_traefik_equals_what_pulumi_declares(stack: local.LocalStack) -> None:
    declared = run_program({**VALID_CONFIG, "domain": stack.options.domain, "acmeEmail": stack.options.acme_email})
    pulumi_inputs = declared.one("docker:index/container:Container", "-traefik").inputs
    running = docker_engine().containers.get(TRAEFIK_CONTAINER).attrs
    local_cmd, declared_cmd = running["Config"]["Cmd"], pulumi_inputs["command"]
    assert f"{CA_FLAG}{PEBBLE_DIRECTORY}" in local_cmd and TRUST_FLAG in local_cmd
    assert f"{CA_FLAG}{LETSENCRYPT_PRODUCTION}" in declared_cmd
    assert without_local_flags(local_cmd) == without_local_flags(declared_cmd)
    assert f"{REDIRECT_FLAG}{stack.options.https_port}" in local_cmd and f"{REDIRECT_FLAG}443" in declared_cmd
    assert {k: v for k, v in running["Config"]["Labels"].items() if k != HASH_LABEL} == {}
    assert_runs_as_declared(
        running,
        pulumi_inputs,
        str(stack.options.data_root),
        local_mounts=((str(stack.inputs.acme_ca_bundle), ACME_CA_BUNDLE_PATH, True),),
    )
    published = sorted(
        (int(port.split("/")[0]), b["HostIp"], int(b["HostPort"]))
        for port, bindings in (running["HostConfig"]["PortBindings"] or {}).items()
        for b in bindings
    )
    ports = {80: stack.options.http_port, 443: stack.options.https_port}
    assert published == sorted({(p["internal"], "127.0.0.1", ports[p["external"]]) for p in pulumi_inputs["ports"]})
    networks = running["NetworkSettings"]["Networks"]
    aliases = set(networks["mlapi"]["Aliases"]) - {running["Id"][:12]}
    assert aliases == set(pulumi_inputs["networksAdvanced"][0].get("aliases", [])) | {stack.options.domain}


def test_local_docker_api_proxy_equals_what_pulumi_declares(stack: local.LocalStack) -> None:
    """Same configuration, mounts and confinement; the image differs (Debian's HAProxy here, the official one there)
    with the same entrypoint semantics, so the declared command means the same."""
    declared = run_program({**VALID_CONFIG, "domain": stack.options.domain, "acmeEmail": stack.options.acme_email})
    pulumi_inputs = declared.one("docker:index/container:Container", "-docker-api").inputs
    running = docker_engine().containers.get(DOCKER_API_CONTAINER).attrs
    assert running["Config"]["Cmd"] == pulumi_inputs["command"]
    assert running["Config"]["Entrypoint"] == ["haproxy", "-W", "-db"]  # what the official image's entrypoint runs
    assert not running["HostConfig"]["PortBindings"]
    assert_runs_as_declared(running, pulumi_inputs, str(stack.options.data_root))


PROBE_DOCKER_API = """
import http.client, json, socket, sys
class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(sys.argv[1])
answers = []
for method, path in json.loads(sys.argv[2]):
    connection = Unix("docker")
    connection.request(method, path)  # no body: the proxy answers a refusal before reading one
    answers.append(connection.getresponse().status)
print(json.dumps(answers))
"""


def test_traefik_reaches_docker_only_through_the_read_only_proxy(stack: local.LocalStack) -> None:
    """Whoever holds Traefik's view of Docker can read the swarm, never change it: every write, and every read
    Traefik does not need (containers, secrets, exec, logs), is a 403 from the proxy. The model's tasks cannot
    reach it at all, and Traefik itself ran without a single refusal."""
    client = docker_engine()
    probes = [
        ("GET", "/v1.41/services"),
        ("GET", "/v1.41/tasks"),
        ("HEAD", "/_ping"),
        ("POST", "/v1.41/containers/create"),
        ("GET", "/v1.41/containers/json"),
        ("POST", f"/v1.41/services/{MODEL_SERVICE}/update"),
        ("DELETE", f"/v1.41/services/{MODEL_SERVICE}"),
        ("GET", "/v1.41/secrets"),
        ("GET", f"/v1.41/services/{MODEL_SERVICE}/logs"),
        ("POST", "/v1.41/swarm/leave"),
    ]
    # Encoded forms one allow-listed segment to the proxy, a forbidden path to the engine (which decodes).
    task_id = client.api.tasks(filters={"service": MODEL_SERVICE})[0]["ID"]
    encoded = [
        ("GET", f"/v1.41/services/{MODEL_SERVICE}%2Flogs?stdout=1"),
        ("GET", f"/v1.41/services/{MODEL_SERVICE}%2flogs?stdout=1"),
        ("GET", f"/v1.41/tasks/{task_id}%2Flogs?stdout=1"),
        ("GET", "/v1.41/nodes/..%2F..%2Fcontainers%2Fjson"),
        ("GET", "/v1.41/services/%2E%2E%2Fsecrets"),
        ("GET", f"/v1.41/services/{MODEL_SERVICE}%252Flogs"),
        ("GET", f"/v1.41/services/{MODEL_SERVICE}%5Clogs"),
    ]
    probes += encoded
    output = client.containers.run(
        stack.inputs.model_image,  # any image with Python; as Traefik's user, with Traefik's mount
        ["python", "-c", PROBE_DOCKER_API, PROXY_SOCKET, json.dumps(probes)],
        user=stack.spec.traefik.user,
        mounts=[Mount(target=PROXY_SOCKET_DIR, source=DOCKER_API_VOLUME, type="volume", read_only=True)],
        network_mode="none",
        remove=True,
    )
    assert json.loads(output) == [200, 200, 200, 403, 403, 403, 403, 403, 403, 403] + [403] * len(encoded)
    assert (
        client.api.inspect_service(MODEL_SERVICE)["Spec"]["Mode"]["Replicated"]["Replicas"] == stack.spec.model.replicas
    )
    # No Docker socket and no proxy socket in a model task.
    [task, *_] = client.containers.list(filters={"label": f"com.docker.swarm.service.name={MODEL_SERVICE}"})
    assert not {m["Destination"] for m in task.attrs["Mounts"]} & {SOCKET, PROXY_SOCKET_DIR}
    probe = task.exec_run(
        ["python", "-c", f"import os; print(os.path.exists({SOCKET!r}), os.path.exists({PROXY_SOCKET!r}))"]
    )
    assert probe.output.decode().split() == ["False", "False"]
    # Traefik's own reads were never refused (a 403 would leave routes out), and it runs as its own user.
    refused = [
        line for line in client.containers.get(DOCKER_API_CONTAINER).logs().decode().splitlines() if " 403 " in line
    ]
    assert not [line for line in refused if not any(f'"{m} {p} ' in line for m, p in probes)], refused
    traefik = client.containers.get(TRAEFIK_CONTAINER)
    assert "403 Forbidden" not in traefik.logs(since=int(time.time()) - 120).decode()
    assert traefik.attrs["State"]["Pid"] and _process_uid(traefik.attrs["State"]["Pid"]) == TRAEFIK_UID


def _max_processes(pid: int) -> int | None:
    """The RLIMIT_NPROC of a host process, as /proc shows it (None: unlimited)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max processes"):
            soft = line.split()[2]
            return None if soft == "unlimited" else int(soft)
    raise AssertionError(f"no Max processes line for pid {pid}")


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_running_containers_have_their_memory_and_process_limits(stack: local.LocalStack) -> None:
    client = docker_engine()
    traefik = client.containers.get(TRAEFIK_CONTAINER).attrs
    assert _max_processes(traefik["State"]["Pid"]) == stack.spec.traefik.confinement.process_limit == 1024
    assert traefik["HostConfig"]["Memory"] == stack.spec.traefik.confinement.memory_bytes
    budget = int(stack.spec.model.env["MLAPI_PROCESS_LIMIT"])
    for task in client.containers.list(filters={"label": f"com.docker.swarm.service.name={MODEL_SERVICE}"}):
        init = task.attrs["State"]["Pid"]  # tini; the app below it lowered its own limit before serving
        [app] = _children(init)
        assert _max_processes(app) == budget and _process_uid(app) == MODEL_UID
        assert task.attrs["HostConfig"]["Memory"] == stack.spec.model.confinement.memory_bytes


def _process_uid(pid: int) -> int:
    """The real uid of a host process (the container's PID 1, as the kernel sees it)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def test_local_model_service_equals_what_pulumi_declares(stack: local.LocalStack) -> None:
    declared = run_program({**VALID_CONFIG, "domain": stack.options.domain, "acmeEmail": stack.options.acme_email})
    service = declared.one("docker:index/service:Service", "-model").inputs
    client = docker_engine()
    running = client.api.inspect_service(MODEL_SERVICE)["Spec"]
    assert running["Name"] == service["name"]
    local_labels = {k: v for k, v in running["Labels"].items() if k != HASH_LABEL}
    declared_labels = {item["label"]: item["value"] for item in service["labels"]}
    limits = {k for k in declared_labels if ".ratelimit." in k or ".inflightreq." in k}
    # The one documented difference: per-client limits are high locally (every local client has one address).
    assert local_labels["traefik.http.middlewares.mlapi-ratelimit.ratelimit.average"] == str(local.LOCAL_RATE_LIMIT)
    assert {k: v for k, v in local_labels.items() if k not in limits} == {
        k: v for k, v in declared_labels.items() if k not in limits
    }
    assert limits <= set(local_labels)
    assert running["Mode"] == {"Replicated": {"Replicas": service["mode"]["replicated"]["replicas"]}}
    assert running["EndpointSpec"]["Mode"] == service["endpointSpec"]["mode"]
    for key, declared_key in (("UpdateConfig", "updateConfig"), ("RollbackConfig", "rollbackConfig")):
        got, want = running[key], service[declared_key]
        assert (got["Parallelism"], got["FailureAction"], got["Order"]) == (
            want["parallelism"],
            want["failureAction"],
            want["order"],
        )
        assert got.get("Delay", 0) == parse_go_duration(want["delay"]) * NS
        assert got["Monitor"] == parse_go_duration(want["monitor"]) * NS
        assert got.get("MaxFailureRatio", 0) == float(want["maxFailureRatio"])
    task, declared_task = running["TaskTemplate"], service["taskSpec"]
    restart = task["RestartPolicy"]
    assert restart["Condition"] == declared_task["restartPolicy"]["condition"]
    assert restart["Delay"] == parse_go_duration(declared_task["restartPolicy"]["delay"]) * NS
    assert restart.get("MaxAttempts", 0) == declared_task["restartPolicy"]["maxAttempts"]
    assert [n["Target"] for n in task["Networks"]] == [client.networks.get("mlapi").id]
    container, declared_container = task["ContainerSpec"], declared_task["containerSpec"]
    assert container["Command"] == declared_container["commands"]
    assert sorted(container["Env"]) == sorted(f"{k}={v}" for k, v in declared_container["env"].items())
    assert container["Init"] is declared_container["init"]
    assert container["StopGracePeriod"] == parse_go_duration(declared_container["stopGracePeriod"]) * NS
    data_root = str(stack.options.data_root)
    assert [
        (
            m["Type"],
            m.get("Source", ""),
            m["Target"],
            m.get("ReadOnly", False),
            m.get("TmpfsOptions", {}).get("SizeBytes"),
        )
        for m in container["Mounts"]
    ] == [
        (
            m["type"],
            m.get("source", "").replace("/srv/mlapi", data_root),
            m["target"],
            m.get("readOnly", False),
            m.get("tmpfsOptions", {}).get("sizeBytes"),
        )
        for m in declared_container["mounts"]
    ]
    assert container.get("ReadOnly") is declared_container["readOnly"] is True
    assert container["CapabilityDrop"] == declared_container["capDrops"] == ["ALL"]
    assert task["Resources"]["Limits"]["MemoryBytes"] == declared_task["resources"]["limits"]["memoryBytes"]
    # And the running task really is confined (not only its spec).
    task_container = tasks(client)[0]
    assert task_container.attrs["HostConfig"]["ReadonlyRootfs"] is True
    assert task_container.exec_run(["sh", "-c", "touch /probe"]).exit_code != 0
    assert task_container.exec_run(["sh", "-c", "touch /tmp/probe && rm /tmp/probe"]).exit_code == 0
    status = task_container.exec_run(["sh", "-c", "grep CapBnd /proc/1/status"]).output.decode()
    assert status.split()[-1] == "0000000000000000", status
    check, declared_check = container["Healthcheck"], declared_container["healthcheck"]
    assert check["Test"] == declared_check["tests"] and check["Retries"] == declared_check["retries"]
    for key, declared_key in (("Interval", "interval"), ("Timeout", "timeout"), ("StartPeriod", "startPeriod")):
        assert check[key] == parse_go_duration(declared_check[declared_key]) * NS
    mounted, declared = container["Secrets"], declared_container["secrets"]
    assert len(mounted) == len(declared) == len(SECRETS)
    for secret, declared_secret in zip(mounted, declared, strict=True):
        assert secret["File"] == {
            "Name": declared_secret["fileName"],
            "UID": declared_secret["fileUid"],
            "GID": declared_secret["fileGid"],
            "Mode": declared_secret["fileMode"],
        }
        assert secret["SecretName"].rsplit("-", 1)[0] == declared_secret["secretName"].rsplit("-", 1)[0]


def test_monitoring_services_equal_what_pulumi_declares(stack: local.LocalStack) -> None:
    """Prometheus, Alertmanager and the node exporter as the program declares them, but for the image (Debian's
    binaries locally) and the test-short timings (the Prometheus files' digest)."""
    declared = run_program({**VALID_CONFIG, "domain": stack.options.domain, "acmeEmail": stack.options.acme_email})
    client = docker_engine()
    for name in (PROMETHEUS_SERVICE, ALERTMANAGER_SERVICE, NODE_EXPORTER_SERVICE):
        service = declared.one("docker:index/service:Service", name.removeprefix("mlapi")).inputs
        want = service["taskSpec"]
        assert ("Global" in client.api.inspect_service(name)["Spec"]["Mode"]) == ("global" in service["mode"])
        got = client.api.inspect_service(name)["Spec"]["TaskTemplate"]
        container, declared_container = got["ContainerSpec"], want["containerSpec"]
        assert container["Command"] == declared_container["commands"]
        assert container["User"] == declared_container["user"] and container["ReadOnly"] is True
        assert [(m["Source"], m["Target"]) for m in container["Mounts"] if m["Type"] == "bind"] == [
            (m["source"].replace("/srv/mlapi", str(stack.options.data_root)), m["target"])
            for m in declared_container["mounts"]
            if m["type"] == "bind"
        ]
        assert got["Resources"]["Limits"]["MemoryBytes"] == want["resources"]["limits"]["memoryBytes"]
        assert got.get("Placement", {}).get("Constraints") == want.get("placement", {}).get("constraints")
        assert not client.api.inspect_service(name).get("Endpoint", {}).get("Ports")
        # The same self-check as the official images' (busybox wget, here Debian's busybox), and it passes.
        assert container["Healthcheck"]["Test"] == declared_container["healthcheck"]["tests"]

        def healthy(service: str = name) -> bool:
            tasks = client.containers.list(filters={"label": f"com.docker.swarm.service.name={service}"})
            return bool(tasks) and all(task.attrs["State"]["Health"]["Status"] == "healthy" for task in tasks)

        wait_until(healthy, 90, f"{name} healthy", interval=2)


def test_prometheus_scrapes_every_replica_and_traefik_and_a_missing_replica_reaches_the_webhook(
    stack: local.LocalStack, alert_receiver: WebhookReceiver
) -> None:
    """The alert path for real: Prometheus scrapes both replicas and the node exporter (swarm DNS), Traefik,
    Alertmanager and itself; the host's own filesystems are in the exporter's metrics; one
    replica fewer fires ModelReplicaMissing, Alertmanager posts it to the webhook with its runbook, and the resolve
    notice follows when the replica is back."""
    client = docker_engine()

    def all_up() -> bool:
        jobs = targets_by_job(client, NETWORK)
        return jobs.get("mlapi-model") == ["up", "up"] and all(
            jobs.get(job) == ["up"] for job in ("node", "traefik", "alertmanager", "prometheus")
        )

    wait_until(all_up, 60, "every scrape target up", interval=2)
    # The host's, not the task's: the data root's filesystem is among those the exporter reports.
    mounts = prometheus_query(client, NETWORK, "/api/v1/query?query=node_filesystem_size_bytes")["data"]["result"]
    assert any(series["metric"]["mountpoint"] == "/" for series in mounts), mounts
    service = client.services.get(MODEL_SERVICE)
    fired = len(alert_receiver.alerts("ModelReplicaMissing", "firing"))
    resolved = len(alert_receiver.alerts("ModelReplicaMissing", "resolved"))
    started = time.monotonic()
    try:
        service.scale(1)
        wait_until(lambda: len(alert_receiver.alerts("ModelReplicaMissing", "firing")) > fired, 120,
                   "the firing notice at the webhook", interval=1)  # fmt: skip
        fired_s = time.monotonic() - started
    finally:
        client.services.get(MODEL_SERVICE).scale(2)
        wait_until(lambda: len(running_tasks(client, MODEL_SERVICE)) == 2, 120, "both replicas back")
    wait_until(lambda: len(alert_receiver.alerts("ModelReplicaMissing", "resolved")) > resolved, 120,
               "the resolve notice at the webhook", interval=1)  # fmt: skip
    notice = alert_receiver.alerts("ModelReplicaMissing", "firing")[-1]
    [alert] = notice["alerts"]
    assert alert["labels"]["severity"] == "page" and "mlapi status" in alert["annotations"]["runbook"]
    assert alert["annotations"]["summary"] == "fewer than 2 model replicas answer their metrics"
    TIMINGS.append(
        f"alerting: a replica fewer reached the webhook after {fired_s:.0f} s (test-short intervals: scrape 2 s, "
        f"for 4 s), the resolve after {time.monotonic() - started:.0f} s"
    )


# -- lifecycle of the local stack ---------------------------------------------------------------------------------
def edge_triton(stack: local.LocalStack) -> tuple[triton.InferenceServerClient, dict[str, str]]:
    """tritonclient through the edge: it dials 127.0.0.1 and verifies the certificate for the domain (SNI), which
    the Host header every call sends (the second value) also names."""
    domain = stack.options.domain
    client = triton.InferenceServerClient(
        f"127.0.0.1:{stack.options.https_port}",
        ssl=True,
        ssl_options={"server_hostname": domain, "ca_certs": str(stack.ca_root)},
        ssl_context_factory=gevent.ssl.create_default_context,
    )
    return client, {"Host": domain}


def test_v2_inference_through_the_edge_equals_predict(stack: local.LocalStack) -> None:
    """The Open Inference Protocol through Traefik over verified HTTPS: health, metadata, and an inference whose
    numbers equal /predict's for the same row."""
    assert https(stack, "GET", "/v2/health/ready")[0] == 200
    status, _, body = https(stack, "GET", "/v2/models/diabetes")
    assert status == 200 and json.loads(body)["inputs"][0]["shape"] == [-1, len(FEATURES)]
    row = record(age=0.02)
    request = {
        "id": "edge-1",
        "parameters": {"confidence": 0.9},
        "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, len(FEATURES)], "data": [list(row.values())]}],
    }
    status, _, body = https(stack, "POST", "/v2/models/diabetes/infer", request)
    assert status == 200, body
    answer = json.loads(body)
    outputs = {tensor["name"]: tensor["data"] for tensor in answer["outputs"]}
    status, _, body = https(stack, "POST", "/predict", {"features": row, "confidence": 0.9})
    rest = json.loads(body)
    assert answer["id"] == "edge-1" and outputs["predict"] == [rest["prediction"]]
    assert outputs["lower"] == [rest["interval"]["lower"]] and outputs["upper"] == [rest["interval"]["upper"]]
    # KServe's own client (its venv), binary tensors, through the edge with the certificate verified for the domain.
    peer = kserve_infer(
        {
            "base_url": f"https://{stack.options.domain}:{stack.options.https_port}",
            "connect": "127.0.0.1",
            "ca": str(stack.ca_root),
            "model": "diabetes",
            "binary": True,
            "inputs": request["inputs"],
            "parameters": request["parameters"],
        }
    )
    assert peer["ready"] and peer["model_ready"] and peer["outputs"]["predict"]["data"] == [rest["prediction"]]
    # tritonclient, binary by default, dialing 127.0.0.1 with the certificate verified for the domain (SNI + Host).
    edge, host = edge_triton(stack)
    assert edge.is_server_ready(headers=host)
    tensor = triton.InferInput("input-0", [1, len(FEATURES)], "FP64")
    tensor.set_data_from_numpy(np.array([list(row.values())]))
    result = edge.infer("diabetes", [tensor], parameters={"confidence": 0.9}, headers=host)
    assert result.as_numpy("predict").tolist() == [rest["prediction"]]
    assert result.as_numpy("upper").tolist() == [rest["interval"]["upper"]]


USERS_CODE = """
from lightgbm import LGBMClassifier  # its wheel loads libgomp.so.1: model.system_packages brings Debian's libgomp1
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder
from unidecode import unidecode  # not in the service's image: the project's requirements.txt brings it


def ascii_folded(frame):
    return frame.map(lambda value: unidecode(value) if isinstance(value, str) else value)


def by_name():
    places = make_pipeline(
        FunctionTransformer(ascii_folded), SimpleImputer(strategy="most_frequent"), OneHotEncoder()
    )
    sizes = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm"]
    columns = ColumnTransformer([("places", places, ["island", "sex"]), ("sizes", SimpleImputer(), sizes)])
    return make_pipeline(columns, LGBMClassifier(n_estimators=50, verbose=-1))
"""
# The project's extra packages, fetched from PyPI on the host and installed into the image offline: two its code
# imports, and the one that reads its Parquet data.
USERS_REQUIREMENTS = f"Unidecode==1.4.0\nlightgbm==4.7.0\n{PARQUET_READER}\n"


def test_local_up_with_a_model_project_serves_it_through_the_edge(stack: local.LocalStack, tmp_path: Path) -> None:
    """`make local-up MODEL=<dir>`: a classifier over categories and gaps, its data in Parquet, trained by the
    project's own code (LightGBM behind a ColumnTransformer selecting columns by name) with packages of its own
    requirements and a Debian library of its system_packages, checked, baked into the model image, rolled out and
    served over HTTPS; a plain `up` afterwards is the bundled model again."""
    project = tmp_path / "penguins"
    shutil.copytree(EXAMPLES / "penguins", project)
    data = project / "data" / "penguins.csv"
    pd.read_csv(data).to_parquet(data.with_suffix(".parquet"))
    data.unlink()
    (project / "penguin_pipeline.py").write_text(USERS_CODE)
    (project / "requirements.txt").write_text(USERS_REQUIREMENTS)
    toml = (project / "mlapi.toml").read_text().replace("data/penguins.csv", "data/penguins.parquet")
    keys = (
        'pipeline = "penguin_pipeline:by_name"\nrequirements = "requirements.txt"\nsystem_packages = ["libgomp1"]\n'
        'trusted_types = ["penguin_pipeline.ascii_folded", "lightgbm.basic.Booster", "lightgbm.sklearn.LGBMClassifier",'
        ' "collections.OrderedDict"]\n'
    )
    (project / "mlapi.toml").write_text(toml.replace("[features]", f"{keys}\n[features]", 1))
    bird = {"island": "Biscoe", "bill_length_mm": 47.5, "bill_depth_mm": 15.0, "flipper_length_mm": 215,
            "body_mass_g": None, "sex": None, "year": 2009}  # fmt: skip
    # Clients of both schemas, through the build and the switch (app/handover.py).
    bird_request = ("/predict", json.dumps({"features": bird, "confidence": 0.9}).encode())
    old_schema = load(stack, rate=8, clients=2, max_seconds=400, batch=None)
    new_schema = load(stack, rate=8, clients=2, max_seconds=400, single=bird_request, batch=None)
    try:
        since = int(time.time())
        with old_schema, new_schema:
            old_schema.wait_for_answers_after(old_schema.report.started_at)
            served = local.up(replace(stack.options, model_project=project), quiet=True)
            new_schema.wait_for_answers_after(time.monotonic())
        record_switch("switch to a model project", old_schema.report, new_schema.report)
        assert served.rollout.startswith("updated"), served.rollout
        status, _, body = https(stack, "GET", "/model")
        card = json.loads(body)
        assert status == 200 and card["name"] == "penguins" and card["estimator"] == "penguin_pipeline:by_name"
        # Trained when the image was built, by the project's code: the replica only copied it in.
        logs = b"".join(docker_engine().services.get(MODEL_SERVICE).logs(stdout=True, stderr=True, since=since))
        assert b"first version v0001: the one built into the image" in logs, logs.decode()[-2000:]
        assert b"in the serving process" not in logs
        status, _, body = https(stack, "POST", "/predict", {"features": bird, "confidence": 0.9})
        assert status == 200, body
        answer = json.loads(body)
        assert answer["label"] == "Gentoo" and answer["label"] in answer["prediction_set"]
        # Both peers' clients, per-feature tensors (BYTES categories, "" and NaN for gaps), through the edge.
        kinds = {"island": "BYTES", "sex": "BYTES", "flipper_length_mm": "INT64", "year": "INT64"}
        tensors = [
            {"name": name, "datatype": kinds.get(name, "FP64"), "shape": [1, 1],
             "data": ["" if value is None and name == "sex" else float("nan") if value is None else value]}
            for name, value in bird.items()
        ]  # fmt: skip
        peer = kserve_infer(
            {"base_url": f"https://{stack.options.domain}:{stack.options.https_port}", "connect": "127.0.0.1",
             "ca": str(stack.ca_root), "model": "penguins", "binary": True, "inputs": tensors,
             "parameters": {"confidence": 0.9}}
        )  # fmt: skip
        assert peer["outputs"]["label"]["data"] == ["Gentoo"]
        edge, host = edge_triton(stack)
        inputs = []
        for tensor in tensors:
            one = triton.InferInput(tensor["name"], [1, 1], tensor["datatype"])
            dtype = {"BYTES": object, "INT64": np.int64, "FP64": np.float64}[tensor["datatype"]]
            one.set_data_from_numpy(np.array([tensor["data"]], dtype=dtype))
            inputs.append(one)
        result = edge.infer("penguins", inputs, parameters={"confidence": 0.9}, headers=host)
        assert [label.decode() for label in result.as_numpy("label").reshape(-1)] == ["Gentoo"]
        np.testing.assert_allclose(result.as_numpy("probabilities")[0], list(answer["probabilities"].values()))
        TIMINGS.append(f"local stack: a model project rolled out in {served.timings['total_s']} s (`up` to served)")
    finally:
        back = local.up(stack.options, quiet=True)
    assert json.loads(https(back, "GET", "/model")[2])["name"] == "diabetes"


def test_a_project_that_cannot_be_served_stops_local_up_before_anything_changes(
    stack: local.LocalStack, tmp_path: Path
) -> None:
    client = docker_engine()
    updated_at = client.api.inspect_service(MODEL_SERVICE)["UpdatedAt"]
    project = tmp_path / "penguins"
    shutil.copytree(EXAMPLES / "penguins", project)
    toml = (project / "mlapi.toml").read_text()
    (project / "mlapi.toml").write_text(toml.replace('target = "species"', 'target = "kind"'))
    with pytest.raises(BuildError, match=r"MODEL=.*penguins: MLAPI_MODEL_PROJECT: .*model.target: column 'kind'"):
        local.up(replace(stack.options, model_project=project), quiet=True)
    assert client.api.inspect_service(MODEL_SERVICE)["UpdatedAt"] == updated_at


def test_a_second_up_changes_nothing(stack: local.LocalStack, capsys: pytest.CaptureFixture[str]) -> None:
    """...and says so as it goes: each image, the deploy, the wait (`make local-up`'s own output)."""
    client = docker_engine()
    updated_at = client.api.inspect_service(MODEL_SERVICE)["UpdatedAt"]
    traefik_id = client.containers.get(TRAEFIK_CONTAINER).id
    again = local.up(stack.options)
    said = capsys.readouterr().out.splitlines()
    told = [line for line in said if line.startswith("image ")]
    for role in ("base", "runtime", "docker-api", "traefik", "pebble", "monitoring", "model"):
        assert any(line.startswith(f"image {role}: ") and "(already built)" in line for line in told), (role, told)
    for step in ("images ready in", "deploying: mlapi-model, mlapi-node-exporter, mlapi-alertmanager, mlapi-prometheus",
                 "mlapi-model: unchanged", "mlapi is up at"):  # fmt: skip
        assert any(step in line for line in said), (step, said)
    assert again.rollout.startswith("unchanged")
    assert client.api.inspect_service(MODEL_SERVICE)["UpdatedAt"] == updated_at
    assert client.containers.get(TRAEFIK_CONTAINER).id == traefik_id
    TIMINGS.append(f"local stack: a second `up` with nothing changed took {again.timings['total_s']} s")


def test_smoke_check_of_pulumi_up_passes_against_the_real_stack(stack: local.LocalStack) -> None:
    """The exact module `pulumi up` runs as its smoke check, run against the real stack (and trusting Pebble)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "infra.ops.smoke",
            "--url",
            f"{stack.url}/health",
            "--attempts",
            "5",
            "--delay",
            "1",
            "--cacert",
            str(stack.ca_root),
            "--connect-to",
            "127.0.0.1",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "healthy after 1 attempt" in result.stdout


def test_down_then_up_keeping_data_serves_a_verifiable_certificate(stack: local.LocalStack) -> None:
    """`make local-down && make local-up`: Pebble comes back with a new root, so the stored certificate must be
    replaced, while models and the prediction log are kept. (Runs after the tests that use the first Pebble.)"""
    client = docker_engine()

    def counts() -> tuple[int, list[str]]:
        logged = tasks(client)[0].exec_run(["python", "-c", COUNT_PREDICTIONS]).output.decode().strip()
        versions = sorted(p.name for p in (stack.options.data_root / "model" / "models").glob("v*"))
        return int(logged), versions

    logged = counts()[0]
    https(stack, "POST", "/predict", {"features": record(age=0.01)})
    wait_until(lambda: counts()[0] > logged, 30, "the prediction in the log (written in the background)")
    before = counts()
    assert before[0] >= 1 and before[1]
    old_serial = serial(stack)
    local.down(stack.options, quiet=True)
    assert not tasks(client), "down waits until the replicas have stopped"
    again = local.up(stack.options, quiet=True)
    assert again.ca_root == stack.ca_root  # the fixture's handle now trusts the new root
    status, _, _ = https(stack, "GET", "/health")  # verifies against Pebble's new root
    assert status == 200
    assert serial(stack) != old_serial
    assert counts() == before


def test_deleting_data_removes_the_configured_root_only(tmp_path: Path) -> None:
    """`make local-destroy` deletes the data root it was given, whatever it is called, and nothing beside it."""
    client = docker_engine()
    data_root = tmp_path / "models-and-logs"
    (data_root / "model").mkdir(parents=True)
    (data_root / "model" / "predictions.sqlite3").write_bytes(b"x")
    os.chown(data_root / "model", 10001, 10001)  # as the service leaves it
    neighbour = tmp_path / "data"
    neighbour.mkdir()
    local.delete_data_root(client, data_root)
    assert not data_root.exists()
    assert neighbour.exists()
