"""The production path on a VM stand-in: the user-data the program renders boots a host with the host key the
program generated (pinned from the first connection), the deploy step runs over SSH (host files, swarm mode), the
stack deploys over ssh:// with the Docker provider's own SSH options, and Traefik gets its certificate from Pebble.

The only difference from production in the user-data is the Docker package source (Debian's docker.io; Docker's
repository cannot be reached here), covered by tests/test_renderers.py. These tests run in CI, never skipped.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from infra import images
from infra.backup import INSTALL_CREDENTIALS, host_setup_parts
from infra.cloud_init import READINESS_COMMAND, hcloud_volume_device, render_user_data
from infra.deploy import docker_ssh_options
from infra.docker_api import DOCKER_API_CONTAINER, SOCKET
from infra.engine import deploy_stack, running_tasks
from infra.host_setup import render_graceful_stop, render_host_setup
from infra.local import LOCAL_IN_FLIGHT, LOCAL_RATE_LIMIT
from infra.smoke import wait_healthy
from infra.spec import (
    APP_COMMAND,
    MODEL_SERVICE,
    SECRETS,
    TRAEFIK_CONTAINER,
    TRAEFIK_UID,
    StackInputs,
    StackSpec,
    build_stack,
)
from tests.conftest import record
from tests.stack_support import COUNT_PREDICTIONS, TIMINGS, docker_engine, wait_until
from tests.standin import (
    StandIn,
    boot_standin,
    build_standin_image,
    https,
    network_with_pebble,
    new_key,
    remove_volume,
    ssh_on_path,
)

pytestmark = pytest.mark.standin

DOMAIN = "vm.mlapi.test"
STANDIN = "mlapi-standin"
PEBBLE = "mlapi-standin-pebble"
CA_ON_HOST = "/etc/mlapi-test/pebble-ca.pem"  # where the stand-in keeps the test CA Traefik must trust


@dataclass
class Environment:
    client: docker.DockerClient
    network: str
    pebble_root: Path
    spec: StackSpec
    user_data: str
    key: Path
    host_key: str
    ssh_options: list[str]
    data_volume: str
    standin_image: str
    tokens: dict[str, str]
    standin: StandIn | None = None
    docker_volume: str = ""
    backup: tuple | None = None  # (BackupSettings, credentials bundle): the program's backup steps, when on

    # -- the transport `pulumi up` uses --------------------------------------------------------------------------
    def ssh(self, command: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["ssh", *self.ssh_options, f"root@{self.standin.ip}", command],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"ssh {command!r} exited {result.returncode}: {result.stdout}{result.stderr}")
        return result

    def ssh_stdin(self, command: str, stdin: str, timeout: float = 600) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["ssh", *self.ssh_options, f"root@{self.standin.ip}", command],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise AssertionError(f"ssh {command[:60]!r} exited {result.returncode}: {result.stdout}{result.stderr}")
        return result

    def remote_docker(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=f"ssh://root@{self.standin.ip}", use_ssh_client=True, timeout=600)

    def https(self, path: str) -> tuple[int, dict, bytes, dict]:
        return https(self.standin.ip, DOMAIN, self.pebble_root, f"GET {path} HTTP/1.1")

    def serial(self) -> str:
        return self.https("/health")[3]["serialNumber"]

    def pebble_orders(self) -> int:
        return len(re.findall(r"Added order", self.client.containers.get(PEBBLE).logs().decode(errors="replace")))

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def boot(self) -> float:
        """Create a "server": a new stand-in with the user-data and the (kept) data volume; wait like pulumi up."""
        started = time.monotonic()
        self.docker_volume = f"mlapi-standin-docker-{uuid.uuid4().hex[:8]}"
        self.standin = boot_standin(
            self.client,
            self.standin_image,
            name=STANDIN,
            network=self.network,
            aliases=[DOMAIN],
            user_data=self.user_data,
            data_volume=self.data_volume,
            docker_volume=self.docker_volume,
        )
        # The very first connection already pins the key the "program" generated and put into user-data.
        wait_until(lambda: self.ssh("true", timeout=20, check=False).returncode == 0, 120, "sshd on the stand-in")
        assert self.standin.host_key() == self.host_key, "cloud-init installed the generated host key"
        # The exact command of the program's wait step. cloud-init may restart sshd meanwhile: like the command
        # provider, which retries its dial, a refused connection (ssh exits 255) is tried again.
        for _ in range(30):
            ready = self.ssh(READINESS_COMMAND, check=False)
            if ready.returncode != 255:
                break
            time.sleep(2)
        assert ready.returncode == 0, f"readiness: exit {ready.returncode}: {ready.stdout}{ready.stderr}"
        return time.monotonic() - started

    def deploy(self) -> float:
        """What ModelStack does: the deploy step over SSH, images onto the host over ssh://, then the stack."""
        started = time.monotonic()
        settings, bundle = self.backup or (None, "")
        self.ssh(render_host_setup(self.spec, *host_setup_parts(settings, "/srv/mlapi")))  # the host-setup command
        if settings is not None:  # the backup-credentials command: stdin only, then restore onto an empty volume
            restored = self.ssh_stdin(INSTALL_CREDENTIALS, bundle)
            self.restore_output = restored.stdout
        ca = (self.pebble_root.parent / "pebble" / "ca.pem").read_bytes()
        subprocess.run(
            [
                "ssh",
                *self.ssh_options,
                f"root@{self.standin.ip}",
                f"mkdir -p {Path(CA_ON_HOST).parent} && cat > {CA_ON_HOST}",
            ],
            input=ca,
            check=True,
            timeout=60,
        )
        remote = self.remote_docker()
        try:
            for tag in {self.spec.traefik.image, self.spec.docker_api.image, self.spec.model.image}:
                remote.images.load(self.client.images.get(tag).save(named=tag))
            deploy_stack(remote, self.spec, self.tokens)
        finally:
            remote.close()
        ok, message = wait_healthy(
            f"https://{DOMAIN}/health",
            attempts=240,
            delay=0.5,
            cacert=str(self.pebble_root),
            connect_to=self.standin.ip,
        )
        if not ok:
            logs = self.ssh(f"docker logs --tail 40 {TRAEFIK_CONTAINER} 2>&1", check=False).stdout
            raise AssertionError(f"{message}\n--- Traefik on the stand-in ---\n{logs}")
        return time.monotonic() - started

    def remove_server(self, *, graceful: bool = False) -> None:
        if graceful and self.standin is not None:
            self.ssh(render_graceful_stop("/srv/mlapi"))  # the data guard's delete, before the volume goes
        if self.standin is not None:
            self.standin.container.remove(force=True)
            self.standin = None
        if self.docker_volume:
            remove_volume(self.client, self.docker_volume)
            self.docker_volume = ""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Environment]:
    client = docker_engine()
    tmp = tmp_path_factory.mktemp("standin")
    started = time.monotonic()
    built = {**images.build_stack_images(client), "standin": build_standin_image(client)}
    images_s = time.monotonic() - started

    key = tmp / "id_ed25519"
    new_key(key)
    host_key = new_key(tmp / "host_ed25519")  # the server's, made before the server exists, as the program does
    ssh_options = [
        *docker_ssh_options(host_key.public_openssh, str(key)),
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
    ]
    data_volume = f"mlapi-standin-data-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as teardown:
        # The ssh wrapper supplies exactly the options the Pulumi Docker provider gets (docker_ssh_options).
        teardown.enter_context(ssh_on_path(tmp / "bin", ssh_options))
        network = teardown.enter_context(network_with_pebble(client, tmp, "mlapi-standin", built["pebble"], PEBBLE))
        teardown.callback(remove_volume, client, client.volumes.create(data_volume).name)

        inputs = StackInputs(
            domain=DOMAIN,
            acme_email="ops@example.com",
            acme_ca_server=f"https://{network.pebble_ip}:14000/dir",
            acme_ca_bundle=CA_ON_HOST,
            model_image=built["model"],
            traefik_image=built["traefik"],
            docker_api_image=built["docker_api"],
            # The load tests' clients all come from this machine's one address (as locally, infra/local.py).
            rate_limit_per_s=LOCAL_RATE_LIMIT,
            rate_limit_burst=LOCAL_RATE_LIMIT,
            in_flight_per_client=LOCAL_IN_FLIGHT,
        )
        spec = build_stack(inputs)
        user_data = render_user_data(
            spec,
            ssh_public_key=(tmp / "id_ed25519.pub").read_text().strip(),
            data_root=inputs.data_root,
            volume_device=hcloud_volume_device(4242),
            docker_source="debian",
            host_key=host_key,
        )
        environment = Environment(
            client,
            network.name,
            network.pebble_root,
            spec,
            user_data,
            key,
            host_key.public_openssh,
            ssh_options,
            data_volume,
            built["standin"],
            tokens={base: uuid.uuid4().hex for base in SECRETS},
        )
        teardown.callback(environment.remove_server)  # before the volume it holds is removed
        boot_s = environment.boot()
        deploy_s = environment.deploy()
        TIMINGS.append(
            f"VM stand-in: images {images_s:.1f} s, boot + cloud-init (installs docker.io) "
            f"{boot_s:.1f} s, deploy over ssh:// to first verified HTTPS 200 {deploy_s:.1f} s"
        )
        yield environment


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


TASK = f"$(docker ps -q --filter label=com.docker.swarm.service.name={MODEL_SERVICE} | head -n 1)"


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


# 4
def test_cron_entry_retrains_through_the_private_path(env: Environment) -> None:
    entry = env.ssh("cat /etc/cron.d/mlapi-retrain").stdout
    assert env.spec.retrain_cron in entry
    assert env.ssh(f"cat {APP_COMMAND}").stdout == env.spec.app_script
    schedule_and_user = env.spec.retrain_cron.split(" root ", 1)
    command = schedule_and_user[1]  # exactly what cron runs, log redirection included
    env.ssh(command)
    outcome = json.loads(env.ssh("cat /var/log/mlapi-retrain.log").stdout.split("\n}\n")[-2] + "\n}")
    assert outcome["outcome"] in {"promoted", "rejected"} and "holdout RMSE" in outcome["reason"]
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


def _data_snapshot(env: Environment) -> tuple[list[str], int]:
    versions = env.ssh("ls /srv/mlapi/model/models").stdout.split()
    count = env.ssh(f"docker exec {TASK} python -c {shlex.quote(COUNT_PREDICTIONS)}")
    return sorted(v for v in versions if v.startswith("v")), int(count.stdout)


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
