"""The whole stack for real on the local Docker engine: Traefik gets a certificate from Pebble over ACME.

These run in CI (never skipped there); elsewhere they skip loudly without a Docker engine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import local
from infra.local import HASH_LABEL, PEBBLE_DIRECTORY, LocalOptions, LocalStack
from infra.smoke import wait_healthy
from infra.spec import ACME_CA_BUNDLE_PATH, LETSENCRYPT_PRODUCTION, MODEL_CONTAINER, TRAEFIK_CONTAINER
from tests.conftest import FEATURES, record
from tests.pulumi_harness import VALID_CONFIG, run_program
from tests.stack_support import (
    COUNT_PREDICTIONS,
    TIMINGS,
    docker_engine,
    free_port,
    https,
    peer_certificate,
    wait_until,
)

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    client = docker_engine()
    empty_engine = not any(image.tags and image.tags[0].startswith("mlapi-") for image in client.images.list())
    local.down(quiet=True)  # container names are the production ones: a running `make local-up` is stopped
    root = tmp_path_factory.mktemp("stack")
    options = LocalOptions(
        http_port=free_port(), https_port=free_port(), data_root=root / "data", state_dir=root / "state"
    )
    try:
        started = local.up(options)
        timing = started.timings
        TIMINGS.append(
            f"local stack: first verified HTTPS 200 {timing['stack_s']} s after images were ready; "
            f"{timing['total_s']} s including image builds ({timing['images_s']} s, "
            f"{'from an empty engine' if empty_engine else 'images cached'})"
        )
        yield started
    finally:
        local.down(options, delete_data=True, quiet=True)


def serial(stack: LocalStack) -> str:
    return peer_certificate(stack)["serialNumber"]


def pebble_orders(client) -> int:
    logs = client.containers.get(local.PEBBLE_CONTAINER).logs().decode(errors="replace")
    return len(re.findall(r"Added order", logs))


# 1
def test_https_chain_verifies_against_pebble_and_names_the_domain(stack: LocalStack) -> None:
    certificate = peer_certificate(stack)  # raises if the chain does not verify against Pebble's root
    assert ("DNS", stack.options.domain) in certificate["subjectAltName"]
    assert "Pebble" in str(certificate["issuer"])
    with pytest.raises(ssl.SSLCertVerificationError):  # and not against the system's roots: a real chain check
        import socket

        context = ssl.create_default_context()
        with socket.create_connection(("127.0.0.1", stack.options.https_port), timeout=10) as raw:
            context.wrap_socket(raw, server_hostname=stack.options.domain)


# 2
def test_http_redirects_to_https_keeping_path_and_query(stack: LocalStack) -> None:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", stack.options.http_port, timeout=10)
    connection.request("GET", "/predict?confidence=0.9&x=a%20b", headers={"Host": stack.options.domain})
    response = connection.getresponse()
    assert response.status == 301
    assert response.getheader("Location") == f"https://{stack.options.domain}/predict?confidence=0.9&x=a%20b"
    status, headers, _ = https(stack, "GET", "/health")
    assert status == 200
    assert headers["strict-transport-security"] == "max-age=31536000; includeSubDomains"


# 3
def test_predict_and_docs_through_traefik(stack: LocalStack) -> None:
    status, _, body = https(stack, "POST", "/predict", {"features": record(), "confidence": 0.95})
    assert status == 200, body
    answer = json.loads(body)
    assert answer["interval"]["lower"] < answer["prediction"] < answer["interval"]["upper"]
    assert answer["interval"]["confidence"] == 0.95
    assert re.fullmatch(r"v\d{4}", answer["model_version"])
    status, _, body = https(stack, "GET", "/docs")
    assert status == 200 and b"swagger-ui" in body
    status, _, body = https(stack, "GET", "/openapi.json")
    assert set(json.loads(body)["components"]["schemas"]["Features"]["required"]) == set(FEATURES)
    status, _, body = https(stack, "POST", "/predict", {"features": record(bmi="x")})
    assert status == 422 and b"bmi" in body


# 4
def test_private_routes_are_not_public_but_the_cron_command_works(stack: LocalStack) -> None:
    token = subprocess.run(
        ["docker", "exec", MODEL_CONTAINER, "cat", "/data/admin-token"], capture_output=True, text=True, check=True
    ).stdout.strip()
    for method, path in (("POST", "/admin/retrain"), ("GET", "/admin/versions"), ("POST", "/admin/rollback")):
        status, _, _ = https(stack, method, path, headers={"Authorization": f"Bearer {token}"})
        assert status == 404, f"{path} must not be routed by the public proxy"
    assert " ".join(stack.spec.retrain_command) in stack.spec.retrain_cron
    result = subprocess.run(list(stack.spec.retrain_command), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["outcome"] in {"promoted", "rejected"}
    assert "holdout RMSE" in outcome["reason"]


# 5
def test_traefik_restart_reuses_the_stored_certificate(stack: LocalStack) -> None:
    client = docker_engine()
    before_serial, before_orders = serial(stack), pebble_orders(client)
    assert (stack.options.data_root / "traefik" / "acme.json").stat().st_size > 0
    client.containers.get(TRAEFIK_CONTAINER).restart(timeout=10)
    ok, message = wait_healthy(
        f"{stack.url}/health", attempts=120, delay=0.5, cacert=str(stack.ca_root), connect_to="127.0.0.1"
    )
    assert ok, message
    assert serial(stack) == before_serial
    assert pebble_orders(client) == before_orders, "a restart must not place a new ACME order"


# 6
def test_killed_model_comes_back_and_data_survives_recreation(stack: LocalStack) -> None:
    client = docker_engine()
    https(stack, "POST", "/predict", {"features": record()})
    model = client.containers.get(MODEL_CONTAINER)
    # A crash, as an OOM kill or a segfault looks: the main process dies. (`docker kill` would not do: Docker
    # records it as a manual stop, which no restart policy undoes.)
    os.kill(model.attrs["State"]["Pid"], signal.SIGKILL)
    wait_until(lambda: https(stack, "GET", "/health")[0] == 200, 120, "the model to be restarted by its policy")
    assert client.containers.get(MODEL_CONTAINER).attrs["RestartCount"] >= 1

    def counts() -> tuple[int, list[str]]:
        logged = subprocess.run(
            ["docker", "exec", MODEL_CONTAINER, "python", "-c", COUNT_PREDICTIONS],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        versions = sorted(p.name for p in (stack.options.data_root / "model" / "models").glob("v*"))
        return int(logged), versions

    https(stack, "POST", "/predict", {"features": record(age=0.01)})
    time.sleep(1)  # the prediction log writes in the background
    before = counts()
    assert before[0] >= 1 and before[1]
    client.containers.get(MODEL_CONTAINER).remove(force=True)
    local.run_spec_container(client, stack.spec.model, stack.spec.network)
    wait_until(lambda: https(stack, "GET", "/ready")[0] == 200, 180, "the recreated model to be ready")
    assert counts() == before


CA_FLAG = "--certificatesresolvers.letsencrypt.acme.caserver="
TRUST_FLAG = f"--certificatesresolvers.letsencrypt.acme.cacertificates={ACME_CA_BUNDLE_PATH}"


def without_ca_flags(flags: list[str]) -> list[str]:
    """Traefik's flags minus the documented local difference: which ACME CA, and trusting it."""
    return [flag for flag in flags if not flag.startswith(CA_FLAG) and flag != TRUST_FLAG]


# 7
def test_local_containers_equal_what_pulumi_declares(stack: LocalStack) -> None:
    """Labels, flags, env, mounts, healthchecks and restart policies match the program under mocks, apart from
    the documented local differences (infra/local.py docstring)."""
    declared = run_program({**VALID_CONFIG, "domain": stack.options.domain, "acmeEmail": stack.options.acme_email})
    client = docker_engine()
    data_root = str(stack.options.data_root)
    for suffix, name in (("-traefik", TRAEFIK_CONTAINER), ("-model", MODEL_CONTAINER)):
        pulumi_inputs = declared.one("docker:index/container:Container", suffix).inputs
        running = client.containers.get(name).attrs
        assert running["Name"] == f"/{pulumi_inputs['name']}"

        local_cmd = running["Config"]["Cmd"]
        declared_cmd = pulumi_inputs["command"]
        if name == TRAEFIK_CONTAINER:
            assert f"{CA_FLAG}{PEBBLE_DIRECTORY}" in local_cmd and TRUST_FLAG in local_cmd
            assert f"{CA_FLAG}{LETSENCRYPT_PRODUCTION}" in declared_cmd
        assert without_ca_flags(local_cmd) == without_ca_flags(declared_cmd)

        labels = {k: v for k, v in running["Config"]["Labels"].items() if k != HASH_LABEL}
        assert labels == {item["label"]: item["value"] for item in pulumi_inputs.get("labels", [])}

        for entry in pulumi_inputs.get("envs", []):
            assert entry in running["Config"]["Env"]

        local_mounts = sorted((m["Source"], m["Destination"], not m["RW"]) for m in running["Mounts"])
        declared_mounts = sorted(
            (m["source"].replace("/srv/mlapi", data_root), m["target"], m["readOnly"]) for m in pulumi_inputs["mounts"]
        )
        if name == TRAEFIK_CONTAINER:
            declared_mounts = sorted([*declared_mounts, (str(stack.inputs.acme_ca_bundle), ACME_CA_BUNDLE_PATH, True)])
        assert local_mounts == declared_mounts

        check = running["Config"]["Healthcheck"]
        declared_check = pulumi_inputs["healthcheck"]
        seconds = lambda text: int(text.rstrip("s")) * 1_000_000_000  # noqa: E731
        assert check["Test"] == declared_check["tests"]
        assert (check["Interval"], check["Timeout"], check["StartPeriod"], check["Retries"]) == (
            seconds(declared_check["interval"]),
            seconds(declared_check["timeout"]),
            seconds(declared_check["startPeriod"]),
            declared_check["retries"],
        )

        assert running["HostConfig"]["RestartPolicy"]["Name"] == pulumi_inputs["restart"]
        published = sorted(
            (int(port.split("/")[0]), b["HostIp"], int(b["HostPort"]))
            for port, bindings in (running["HostConfig"]["PortBindings"] or {}).items()
            for b in bindings
        )
        declared_ports = sorted(
            {
                (
                    p["internal"],
                    "127.0.0.1",
                    {80: stack.options.http_port, 443: stack.options.https_port}[p["external"]],
                )
                for p in pulumi_inputs.get("ports", [])
            }
        )
        assert published == declared_ports

        networks = running["NetworkSettings"]["Networks"]
        assert list(networks) == [pulumi_inputs["networksAdvanced"][0]["name"]]
        declared_aliases = set(pulumi_inputs["networksAdvanced"][0].get("aliases", []))
        local_aliases = set(networks["mlapi"]["Aliases"]) - {running["Id"][:12]}
        if name == TRAEFIK_CONTAINER:
            declared_aliases |= {stack.options.domain}
        assert local_aliases == declared_aliases


# 8 is in tests/test_renderers.py (the rendered user-data passes `cloud-init schema`) and runs in the same CI job.


def test_smoke_check_of_pulumi_up_passes_against_the_real_stack(stack: LocalStack) -> None:
    """The exact module `pulumi up` runs as its smoke check, run against the real stack (and trusting Pebble)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "infra.smoke",
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
        cwd=Path(__file__).resolve().parents[1],
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "healthy after 1 attempt" in result.stdout


def test_down_then_up_keeping_data_serves_a_verifiable_certificate(stack: LocalStack) -> None:
    """`make local-down && make local-up`: Pebble comes back with a new root, so the stored certificate must be
    replaced, while models and the prediction log are kept. (Runs after the tests that use the first Pebble.)"""
    versions = sorted(p.name for p in (stack.options.data_root / "model" / "models").glob("v*"))
    old_serial = serial(stack)
    local.down(stack.options, quiet=True)
    again = local.up(stack.options, quiet=True)
    assert again.ca_root == stack.ca_root  # the fixture's handle now trusts the new root
    status, _, _ = https(stack, "GET", "/health")  # verifies against Pebble's new root
    assert status == 200
    assert serial(stack) != old_serial
    assert sorted(p.name for p in (stack.options.data_root / "model" / "models").glob("v*")) == versions


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
