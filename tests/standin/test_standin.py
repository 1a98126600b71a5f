"""The production path on a VM stand-in: the user-data the program renders boots a host with the host key the
program generated (pinned from the first connection), the deploy step runs over SSH (host files, swarm mode), the
stack deploys over ssh:// with the Docker provider's own SSH options, and Traefik gets its certificate from Pebble.

The only difference from production in the user-data is the Docker package source (Debian's docker.io; Docker's
repository cannot be reached here), covered by tests/unit/test_renderers.py. These tests run in CI, never skipped.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from infra.config.project import PROJECT_DOCKERFILE, check_project
from infra.host.deploy import docker_ssh_options
from infra.host.setup import (
    HEARTBEAT_CRON_FILE,
    HEARTBEAT_LOG,
    HEARTBEAT_URL_FILE,
    REMOVE_HEARTBEAT_URL,
    render_host_setup,
)
from infra.local.engine import deploy_stack, running_tasks
from infra.ops.smoke import wait_healthy
from infra.spec.docker_api import DOCKER_API_CONTAINER, SOCKET
from infra.spec.inputs import DEFAULT_DATA_ROOT
from infra.spec.stack import APP_COMMAND, MODEL_SERVICE, MODEL_UID, TRAEFIK_CONTAINER, TRAEFIK_UID, project_tag
from testbed.stack import COUNT_PREDICTIONS, free_port, wait_until
from testbed.standin import DOMAIN, TASK, Environment
from tests.support.service import record

PROJECT_ROOT = Path(__file__).resolve().parents[2]

PROJECT_DIR = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.standin


# 1
def test_cloud_init_finished_from_the_nocloud_seed_without_errors(env: Environment) -> None:
    status = env.ssh("cloud-init status --long", check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "status: done" in status.stdout
    assert "DataSourceNoCloud" in status.stdout  # a missing seed would silently be DataSourceNone
    result = json.loads(env.ssh("cat /run/cloud-init/result.json").stdout)
    assert result["v1"]["errors"] == []
    assert env.ssh("ls /etc/ssh/ssh_host_*_key").stdout.split() == ["/etc/ssh/ssh_host_ed25519_key"]
    schema = env.ssh("cloud-init schema --system", check=False)
    assert schema.returncode == 0 and "Valid" in schema.stdout, schema.stdout + schema.stderr


# 2
def test_swarm_service_with_log_rotation_and_only_traefik_publishes(env: Environment) -> None:
    info = json.loads(env.ssh("docker info --format '{{json .}}'").stdout)
    assert info["LoggingDriver"] == "json-file"
    assert info["Swarm"]["LocalNodeState"] == "active" and info["Swarm"]["ControlAvailable"] is True
    again = env.ssh(render_host_setup(env.spec))  # the deploy step of the next `pulumi up`: idempotent
    assert again.stdout.strip() == "host ready", again.stdout
    remote = env.remote_docker()
    try:
        assert len(running_tasks(remote, MODEL_SERVICE)) == env.spec.model.replicas
    finally:
        remote.close()
    inspect = json.loads(env.ssh(f"docker inspect {TASK}").stdout)[0]
    assert inspect["HostConfig"]["LogConfig"] == {"Type": "json-file", "Config": {"max-file": "5", "max-size": "10m"}}
    # Least privilege on the VM's running containers: read-only roots, no capabilities, Traefik as its own user, and
    # the Docker socket only in the network-less proxy.
    assert inspect["HostConfig"]["ReadonlyRootfs"] is True and inspect["HostConfig"]["CapDrop"] == ["ALL"]
    assert inspect["HostConfig"]["Memory"] == env.spec.model.confinement.memory_bytes
    edge = json.loads(env.ssh(f"docker inspect {TRAEFIK_CONTAINER}").stdout)[0]
    assert (edge["HostConfig"]["ReadonlyRootfs"], edge["HostConfig"]["CapDrop"]) == (True, ["ALL"])
    assert not edge["HostConfig"]["CapAdd"] and edge["Config"]["User"] == f"{TRAEFIK_UID}:{TRAEFIK_UID}"
    assert edge["HostConfig"]["SecurityOpt"] == ["no-new-privileges:true"]
    assert SOCKET not in {m["Source"] for m in edge["Mounts"]}
    proxy = json.loads(env.ssh(f"docker inspect {DOCKER_API_CONTAINER}").stdout)[0]
    assert proxy["HostConfig"]["NetworkMode"] == "none" and SOCKET in {m["Source"] for m in proxy["Mounts"]}
    refused = env.ssh(f"docker logs {DOCKER_API_CONTAINER} 2>&1 | grep -c ' 403 ' || true").stdout.strip()
    assert refused == "0", "Traefik asked the Docker API proxy for something it refuses"
    # The certificate store belongs to Traefik's user (a volume from before held root's).
    owners = env.ssh("stat -c %u /srv/mlapi/traefik /srv/mlapi/traefik/*.json").stdout.split()
    assert set(owners) == {str(TRAEFIK_UID)}, owners
    publishing = {}
    for line in env.ssh("docker ps --format '{{.Names}} {{.Ports}}'").stdout.splitlines():
        name, _, ports = line.partition(" ")
        if "->" in ports:
            publishing[name] = ports
    assert list(publishing) == [TRAEFIK_CONTAINER]
    assert "0.0.0.0:443->8443/tcp" in publishing[TRAEFIK_CONTAINER]
    # Containers cannot reach the instance metadata service (user-data holds the host key).
    assert "-A DOCKER-USER -d 169.254.169.254/32 -j REJECT" in env.ssh("iptables -S DOCKER-USER").stdout


# The stand-in has no metadata service. A route of its own sends the address into a bridge with no port, so a packet
# that got past the firewall would vanish there (a timeout), never leave this machine; the rule answers at once.
METADATA_DEAD_END = (
    "ip link show mlapi-nowhere >/dev/null 2>&1 || { ip link add mlapi-nowhere type bridge && "
    "ip link set mlapi-nowhere up && ip route replace 169.254.169.254/32 dev mlapi-nowhere; }"
)
PROBE_METADATA = (
    "import socket\n"
    "try:\n"
    "    socket.create_connection(('169.254.169.254', 80), timeout=5)\n"
    "    print('connected')\n"
    "except ConnectionRefusedError:\n"
    "    print('refused')\n"
    "except OSError as exc:\n"
    "    print(type(exc).__name__)\n"
)


def test_a_container_that_tries_the_metadata_service_is_refused(env: Environment) -> None:
    env.ssh(METADATA_DEAD_END)
    answer = env.ssh(f"docker exec {TASK} python -c {shlex.quote(PROBE_METADATA)}").stdout.strip()
    assert answer == "refused", f"a model replica reaching for 169.254.169.254 got: {answer}"
    # Without the rule the same probe ends in the dead end (no neighbour answers there: "no route to host", or a
    # timeout), never refused: the rule, not the route, refused it.
    rule = "DOCKER-USER -d 169.254.169.254/32 -j REJECT"
    env.ssh(f"iptables -D {rule}")
    try:
        unguarded = env.ssh(f"docker exec {TASK} python -c {shlex.quote(PROBE_METADATA)}").stdout.strip()
    finally:
        env.ssh(f"iptables -I {rule}")
    assert unguarded in ("TimeoutError", "OSError"), unguarded


# 3
def test_ssh_is_key_only_and_security_upgrades_are_on(env: Environment) -> None:
    attempt = subprocess.run(
        [
            "/usr/bin/ssh",
            *docker_ssh_options(env.host_key, None),
            "-o",
            "BatchMode=yes",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            f"root@{env.standin.ip}",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert attempt.returncode == 255
    assert "Permission denied (publickey)" in attempt.stderr
    effective = env.ssh("sshd -T").stdout
    assert "passwordauthentication no" in effective and "permitrootlogin without-password" in effective
    assert 'APT::Periodic::Unattended-Upgrade "1"' in env.ssh("cat /etc/apt/apt.conf.d/20auto-upgrades").stdout
    assert env.ssh("dpkg-query -W -f='${Status}' unattended-upgrades").stdout == "install ok installed"
    # ssh-audit (Debian's) from outside, as an attacker scanning port 22 would: no algorithm rated a failure.
    audit = subprocess.run(["ssh-audit", "-n", env.standin.ip], capture_output=True, text=True, timeout=120)
    assert "ssh-ed25519" in audit.stdout, audit.stdout + audit.stderr  # it did talk to the server
    failures = [line for line in audit.stdout.splitlines() if "[fail]" in line]
    assert not failures, "\n".join(failures)
    assert "ecdsa-sha2-nistp256" not in audit.stdout and "hmac-sha1" not in audit.stdout


def test_a_wrong_host_key_is_refused_from_the_first_connection(env: Environment, tmp_path: Path) -> None:
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = Path(f"{other}.pub").read_text().strip()
    attempt = subprocess.run(
        # /usr/bin/ssh itself: the fixture's wrapper first on PATH would add the right pin before ours.
        [
            "/usr/bin/ssh",
            *docker_ssh_options(wrong, str(env.key)),
            "-o",
            "BatchMode=yes",
            f"root@{env.standin.ip}",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert attempt.returncode == 255 and "Host key verification failed" in attempt.stderr


def cron_command(cron_file: str, runs: str) -> str:
    """The command of the cron line that runs ``runs``, as cron would run it (after the schedule and the user)."""
    [line] = [line for line in cron_file.splitlines() if runs in line and " root " in line]
    return line.split(" root ", 1)[1]


# 4
def test_cron_entry_retrains_through_the_private_path(env: Environment) -> None:
    entry = env.ssh("cat /etc/cron.d/mlapi-retrain").stdout
    assert env.spec.retrain_cron in entry
    assert env.ssh(f"cat {APP_COMMAND}").stdout == env.spec.app_script
    env.ssh(cron_command(entry, "mlapi-app retrain"))  # exactly what cron runs, log redirection included
    lines = env.ssh("cat /var/log/mlapi-retrain.log").stdout.splitlines()
    start = len(lines) - 1 - lines[::-1].index("{")  # the last run's outcome: the JSON after its phases
    outcome = json.loads("\n".join(lines[start : lines.index("}", start) + 1]))
    assert outcome["outcome"] in {"promoted", "rejected"} and "holdout RMSE" in outcome["reason"]
    assert any(line.startswith("retrain [") and "training a candidate" in line for line in lines[:start])
    assert env.https("/admin/retrain")[0] == 404
    assert env.https("/admin/versions")[0] == 404
    # The log it appends to is rotated: the installed logrotate accepts the policy the user-data wrote.
    check = env.ssh("logrotate --debug /etc/logrotate.d/mlapi-retrain 2>&1", check=False)
    assert check.returncode == 0 and "error" not in check.stdout.lower(), check.stdout


# 5
def test_https_verifies_against_pebble_and_http_redirects(env: Environment) -> None:
    status, headers, _, certificate = env.https("/health")
    assert status == 200 and "strict-transport-security" in headers
    assert ("DNS", DOMAIN) in certificate["subjectAltName"]
    with socket.create_connection((env.standin.ip, 80), timeout=10) as plain:
        plain.sendall(f"GET /model?x=1 HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode())
        head = plain.recv(4096).decode()
    assert head.startswith("HTTP/1.1 301")
    assert f"Location: https://{DOMAIN}/model?x=1" in head


def test_a_model_project_is_built_on_the_server_and_served(env: Environment, tmp_path: Path) -> None:
    """What `pulumi up` does with modelProject: the program's image resource builds app/Dockerfile.project on the
    server's own engine (over ssh://), FROM the model image already there, training the first version in the build;
    the service rolls onto it and the edge serves the project; the bundled model comes back the same way."""
    project = tmp_path / "penguins"
    shutil.copytree(PROJECT_DIR / "examples" / "penguins", project)
    check_project(project)  # the program's own check first, as __main__.py runs it
    tag = f"mlapi-model-project:{project_tag(env.spec.model.image, project)}"
    remote = env.remote_docker()
    try:
        remote.images.build(
            path=str(project), dockerfile=str(PROJECT_DOCKERFILE), buildargs={"MODEL_IMAGE": env.spec.model.image},
            tag=tag, rm=True,
        )  # fmt: skip
        served = deploy_stack(remote, replace(env.spec, model=replace(env.spec.model, image=tag)), env.tokens)
        assert served.action == "updated", served
        status, _, body, _ = env.https("/model")
        card = json.loads(body)
        assert status == 200 and card["name"] == "penguins" and card["version"] == "v0001", body[:300]
        logs = env.ssh(f"docker service logs {MODEL_SERVICE} 2>&1").stdout
        assert "first version v0001: the one built into the image" in logs, logs[-2000:]
    finally:
        back = deploy_stack(remote, env.spec, env.tokens)
        remote.close()
    assert back.action == "updated"
    assert json.loads(env.https("/model")[2])["name"] == "diabetes"


def _data_snapshot(env: Environment) -> tuple[list[str], int]:
    versions = env.ssh("ls /srv/mlapi/model/models").stdout.split()
    count = env.ssh(f"docker exec {TASK} python -c {shlex.quote(COUNT_PREDICTIONS)}")
    return sorted(v for v in versions if v.startswith("v")), int(count.stdout)


def test_heartbeats_reach_a_checker_while_the_edge_answers_and_after_a_retrain(
    env: Environment, tmp_path: Path
) -> None:
    """heartbeatUrl: the program's heartbeat command writes the URL, the installed cron lines ping it (a checker on
    the stand-in stands for healthchecks.io); with the edge down the ping stops, which is what the checker notices.
    (Cron runs the edge job every 5 min here too: its pings may arrive at any time, so counts are taken inside the
    windows where none can.)"""
    url = env.heartbeat_checker()
    assert env.ssh(f"stat -c '%a %U' {HEARTBEAT_URL_FILE}").stdout.strip() == "600 root"
    edge = cron_command(env.ssh(f"cat {HEARTBEAT_CRON_FILE}").stdout, "mlapi-heartbeat edge")
    retrain = cron_command(env.ssh("cat /etc/cron.d/mlapi-retrain").stdout, "mlapi-app retrain")

    env.ssh(edge)
    assert f"{urlsplit(url).path} mlapi-heartbeat/edge" in env.heartbeats()
    env.ssh(retrain)
    assert any(ping.endswith("mlapi-heartbeat/retrain") for ping in env.heartbeats())
    log = env.ssh(f"cat {HEARTBEAT_LOG}").stdout
    assert "ping sent (edge)" in log and "ping sent (retrain)" in log and urlsplit(url).path not in log
    shown = mlapi_over_ssh(env, tmp_path, "logs", "heartbeat", "--tail", "20")  # the operator reads the same log
    assert shown.returncode == 0 and "ping sent (retrain)" in shown.stdout, shown.stderr[-2000:]

    env.ssh(f"docker stop {TRAEFIK_CONTAINER}")
    try:
        before = len(env.heartbeats())  # the edge is down: no ping can come from cron either
        down = env.ssh(edge, check=False)
        assert down.returncode != 0 and len(env.heartbeats()) == before
        assert (
            f"https://{DOMAIN}/health did not answer 200 on this host; no ping sent"
            in env.ssh(f"tail -n 1 {HEARTBEAT_LOG}").stdout
        )
    finally:
        env.ssh("/usr/local/sbin/mlapi-start-edge", timeout=330)
    env.ssh(REMOVE_HEARTBEAT_URL)  # the key removed: the installed jobs stay and send nothing
    before = len(env.heartbeats())
    assert env.ssh(edge, check=False).returncode == 0 and len(env.heartbeats()) == before
    env.ssh("pkill -f '[C]hecker' || true")
    ok, message = wait_healthy(
        f"https://{DOMAIN}/health", attempts=120, delay=0.5, cacert=str(env.pebble_root), connect_to=env.standin.ip
    )
    assert ok, message


def test_the_boot_guard_starts_an_edge_that_did_not_come_back(env: Environment) -> None:
    """Docker may restore Traefik before swarm mode has the overlay network back, and then never retries; the
    @reboot job the deploy step installs starts it once both are there."""
    assert "@reboot root /usr/local/sbin/mlapi-start-edge" in env.ssh("cat /etc/cron.d/mlapi-boot").stdout
    env.ssh(f"docker stop {TRAEFIK_CONTAINER}")  # a manual stop: no restart policy brings it back
    assert env.ssh(f"docker inspect --format '{{{{.State.Running}}}}' {TRAEFIK_CONTAINER}").stdout.strip() == "false"
    started = env.ssh("/usr/local/sbin/mlapi-start-edge", timeout=330)
    assert "mlapi-traefik running" in started.stdout
    ok, message = wait_healthy(
        f"https://{DOMAIN}/health", attempts=120, delay=0.5, cacert=str(env.pebble_root), connect_to=env.standin.ip
    )
    assert ok, message


# 6
def test_reboot_brings_the_stack_back_with_the_same_certificate(env: Environment) -> None:
    serial, orders = env.serial(), env.pebble_orders()
    env.standin.container.restart(timeout=20)
    wait_until(lambda: env.ssh("docker ps -q", timeout=20, check=False).returncode == 0, 180, "ssh and docker back")
    ok, message = wait_healthy(
        f"https://{DOMAIN}/health", attempts=360, delay=0.5, cacert=str(env.pebble_root), connect_to=env.standin.ip
    )
    assert ok, message
    assert env.serial() == serial
    assert env.pebble_orders() == orders


# 7
def test_server_replacement_keeps_models_log_and_certificate(env: Environment) -> None:
    assert env.https("/health")[0] == 200
    # Some traffic, so the prediction log has rows to keep (sent from inside the host, as an operator would).
    body = json.dumps({"features": record()})
    request = (
        "import urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:8000/predict', "
        f"data={body!r}.encode(), headers={{'Content-Type': 'application/json'}}))"
    )
    logged = _data_snapshot(env)[1]
    env.ssh(f"docker exec {TASK} python -c {shlex.quote(request)}")
    wait_until(lambda: _data_snapshot(env)[1] > logged, 30, "the prediction in the log (written in the background)")
    before = _data_snapshot(env)
    assert before[0] and before[1] >= 1
    serial, orders = env.serial(), env.pebble_orders()

    # What `pulumi up` does when the server is replaced: the data guard stops the stack and unmounts the volume,
    # the server goes, a new one boots from the same user-data with the same volume, and everything bound to the
    # server is created on it again (deploy step, swarm, network, secret, Traefik, service).
    env.remove_server(graceful=True)
    env.boot()
    env.deploy()

    assert _data_snapshot(env) == before
    assert env.serial() == serial, "acme.json on the volume: the certificate is reused"
    assert env.pebble_orders() == orders, "no new ACME order after a server replacement"


def mlapi_over_ssh_command(
    env: Environment, tmp_path: Path, *args: str, host_key: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """`mlapi` against the stand-in as against a Pulumi stack: its outputs saved to a file, SSH with the host key
    pinned from them. PATH without the fixture's ssh wrapper: only mlapi's own options decide what is trusted."""
    outputs = tmp_path / "standin.json"
    outputs.write_text(
        json.dumps(
            {
                "url": f"https://{DOMAIN}",
                "ipv4": env.standin.ip,
                "hostKey": host_key or env.host_key,
                "dataRoot": DEFAULT_DATA_ROOT,
            }
        )
    )
    command = [sys.executable, "-m", "infra.ops", "--outputs", str(outputs), "--identity", str(env.key), *args]
    return command, {**os.environ, "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def mlapi_over_ssh(
    env: Environment, tmp_path: Path, *args: str, host_key: str | None = None
) -> subprocess.CompletedProcess:
    command, environment = mlapi_over_ssh_command(env, tmp_path, *args, host_key=host_key)
    return subprocess.run(command, capture_output=True, text=True, env=environment, cwd=PROJECT_ROOT, timeout=600)


def test_mlapi_ui_reaches_prometheus_on_the_server_over_ssh(env: Environment, tmp_path: Path) -> None:
    """`mlapi ui` as an operator runs it against a Pulumi stack: each connection over the pinned SSH into a replica,
    and from there to Prometheus on the overlay; the targets it answers are the server's."""
    port = free_port()
    command, environment = mlapi_over_ssh_command(env, tmp_path, "ui", "prometheus", "--port", str(port))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
                               cwd=PROJECT_ROOT)  # fmt: skip
    try:
        assert process.stdout is not None
        told = process.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in told, told + (process.stderr.read() if process.stderr else "")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            for _ in range(3):  # three connections: each its own relay
                answer = client.get("/api/v1/targets?state=active", headers={"Connection": "close"})
                assert answer.status_code == 200, answer.text[:500]
            jobs = {target["labels"]["job"] for target in answer.json()["data"]["activeTargets"]}
            assert {"mlapi-model", "traefik", "prometheus", "alertmanager"} <= jobs
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(30)
    assert code == 0


def test_mlapi_operates_the_server_over_ssh_with_the_pinned_host_key(env: Environment, tmp_path: Path) -> None:
    status = mlapi_over_ssh(env, tmp_path, "status", "--json")
    found = json.loads(status.stdout)
    # The earlier tests' loads sent one record thousands of times: that drift is real, and the only problem.
    assert [p for p in found["problems"] if not p.startswith("drift: PSI above 0.2")] == [], found["problems"]
    assert status.returncode == (1 if found["problems"] else 0), status.stderr
    assert found["desired"] == len(found["replicas"]) == 2
    assert {r["version"] for r in found["replicas"]} == {found["current_version"]}
    assert found["certificate"]["issuer"].startswith("Pebble") and found["disk"]["size"] > 0
    versions = json.loads(mlapi_over_ssh(env, tmp_path, "versions", "--json").stdout)
    assert versions["current"] == found["current_version"]
    who = mlapi_over_ssh(env, tmp_path, "exec", "--", "id", "-u")
    assert who.returncode == 0 and who.stdout.strip() == str(MODEL_UID), who.stderr
    logs = mlapi_over_ssh(env, tmp_path, "logs", "model", "--since", "24h")
    assert logs.returncode == 0 and "Uvicorn running" in logs.stdout + logs.stderr, logs.stderr[-2000:]


def test_mlapi_refuses_a_server_that_shows_another_host_key(env: Environment, tmp_path: Path) -> None:
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = Path(f"{other}.pub").read_text().strip()
    status = mlapi_over_ssh(env, tmp_path, "status", host_key=wrong)
    assert status.returncode == 1 and "Host key verification failed" in status.stdout, status.stdout
