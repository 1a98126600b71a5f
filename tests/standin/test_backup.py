"""Backups with restic on the VM stand-in, to an sftp target on the test network (an sshd container, as a Hetzner
Storage Box would be): the program's deploy step installs restic and the scripts, the credentials arrive on stdin,
a backup under load costs no request, a restore brings the data back, and the disaster path (new server, new empty
volume) restores before anything starts: same models, same log, same certificate, no new ACME order.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.host.backup import credentials_bundle
from infra.ops.smoke import wait_healthy
from infra.spec.backup import BackupSettings
from testbed.stack import COUNT_PREDICTIONS, TIMINGS, wait_until
from testbed.standin import DOMAIN, TASK, Environment
from tests.support.load import WATCHING_RATE, Load
from tests.support.service import record

pytestmark = pytest.mark.standin
TARGET = "mlapi-backup-target"
TARGET_HOST = "backup.mlapi.test"
# Daily, 12 hours from now: the stand-in's cron is real, and a run that fired during the tests (as 02:30 once did, in
# a CI run at 02:30) would leave its own outcome in the status the later tests read.
SCHEDULE = f"30 {(time.gmtime().tm_hour + 12) % 24} * * *"


@pytest.fixture(scope="module")
def backed_up(env: Environment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Environment]:
    """The stand-in with backups turned on the way `pulumi up` does it."""
    tmp = tmp_path_factory.mktemp("backup")
    key = tmp / "backup_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    target = env.client.containers.run(
        env.standin_image,
        [
            "sh",
            "-c",
            "ssh-keygen -A >/dev/null && mkdir -p /run/sshd /root/.ssh /backups && "
            f"echo {shlex.quote(Path(f'{key}.pub').read_text().strip())} > /root/.ssh/authorized_keys && "
            "exec /usr/sbin/sshd -D -e",
        ],
        name=TARGET,
        detach=True,
        network=env.network,
    )
    try:
        env.client.api.disconnect_container_from_network(target.id, env.network)
        env.client.api.connect_container_to_network(target.id, env.network, aliases=[TARGET_HOST])
        wait_until(lambda: target.exec_run(["test", "-s", "/etc/ssh/ssh_host_ed25519_key.pub"]).exit_code == 0, 30, "")
        host_key = target.exec_run(["cat", "/etc/ssh/ssh_host_ed25519_key.pub"]).output.decode().split()[:2]
        settings = BackupSettings(f"sftp:root@{TARGET_HOST}:/backups/mlapi", SCHEDULE, sftp_host=TARGET_HOST)
        bundle = credentials_bundle(
            settings, "test repository password", {}, key.read_text(), f"{TARGET_HOST} {' '.join(host_key)}"
        )
        env.backup = (settings, bundle)
        env.deploy()
        assert "nothing to do" in env.restore_output  # the volume has data: no restore on a running stack
        yield env
    finally:
        env.backup = None
        target.remove(force=True)


def snapshot_of_data(env: Environment) -> tuple[list[str], int]:
    versions = env.ssh("ls /srv/mlapi/model/models").stdout.split()
    count = env.ssh(f"docker exec {TASK} python -c {shlex.quote(COUNT_PREDICTIONS)}")
    return sorted(v for v in versions if v.startswith("v")), int(count.stdout)


def predict_inside(env: Environment, n: int) -> None:
    body = json.dumps({"features": record()})
    code = (
        "import urllib.request as u\n"
        f"for _ in range({n}): u.urlopen(u.Request('http://127.0.0.1:8000/predict', data={body!r}.encode(), "
        "headers={'Content-Type': 'application/json'}))"
    )
    before = logged_inside(env)
    env.ssh(f"docker exec {TASK} python -c {shlex.quote(code)}")
    # The prediction log writes in the background: wait for the rows themselves.
    wait_until(lambda: logged_inside(env) >= before + n, 30, f"{n} new rows in the prediction log")


def logged_inside(env: Environment) -> int:
    return int(env.ssh(f"docker exec {TASK} python -c {shlex.quote(COUNT_PREDICTIONS)}").stdout)


def metric(env: Environment, name: str) -> float:
    exposition = env.ssh("mlapi-app metrics").stdout  # private: not routed from the internet
    line = next(line for line in exposition.splitlines() if line.startswith(f"{name} "))
    return float(line.split()[1])


def test_a_backup_under_load_fails_no_request_and_is_exported(backed_up: Environment) -> None:
    env = backed_up
    predict_inside(env, 5)
    traffic = Load(
        DOMAIN, 443, str(env.pebble_root), address=env.standin.ip, clients=8, max_seconds=120, rate=WATCHING_RATE
    )
    scheduled = next(
        line.split(" root ", 1)[1]
        for line in env.ssh("cat /etc/cron.d/mlapi-backup").stdout.splitlines()
        if line.startswith(f"{SCHEDULE} root ")
    )
    env.heartbeat_checker()  # heartbeatUrl set: a good backup pings it
    with traffic:
        traffic.wait_for_answers_after(traffic.report.started_at, count=50)
        began = time.monotonic()
        env.ssh(scheduled)  # exactly what cron runs, log redirection included
        ended = time.monotonic()
        traffic.wait_for_answers_after(ended)
    report = traffic.report
    report.covers(began, ended)
    log = env.ssh("cat /var/log/mlapi-backup.log").stdout
    assert "snapshot saved (1 in the repository)" in log, log
    # (cron's own edge pings, every 5 min, may be among them)
    assert "ping sent (backup)" in log and "mlapi-heartbeat/backup" in [p.split()[-1] for p in env.heartbeats()]
    assert report.outcomes and not report.failed, report.summary()
    before, during = report.latency_ms(end=began), report.latency_ms(start=began, end=ended)
    TIMINGS.append(
        f"backup under load: took {ended - began:.1f} s; {report.summary()}; /predict p50 {before} ms before, "
        f"{during} ms during the backup"
    )
    assert metric(env, "mlapi_backup_snapshots") == 1
    assert time.time() - metric(env, "mlapi_backup_last_success_timestamp_seconds") < 120
    listed = env.ssh("set -a; . /etc/mlapi/backup/env; restic snapshots --json").stdout
    [snapshot] = json.loads(listed)
    assert snapshot["paths"] == ["/var/lib/mlapi-backup/stage"] and snapshot["tags"] == ["mlapi"]
    assert env.ssh("stat -c %a /etc/mlapi/backup/env").stdout.strip() == "600"
    assert "RESTIC_PASSWORD" not in env.ssh("ps -eo args").stdout


def test_a_failed_backup_is_visible(backed_up: Environment) -> None:
    env = backed_up
    env.ssh(
        "cp /etc/mlapi/backup/env /root/env.saved && sed -i 's|^RESTIC_PASSWORD=.*|RESTIC_PASSWORD=wrong|' "
        "/etc/mlapi/backup/env"
    )
    try:
        failed = env.ssh("/usr/local/sbin/mlapi-backup", check=False)
    finally:
        env.ssh("mv /root/env.saved /etc/mlapi/backup/env")
    assert failed.returncode != 0 and "mlapi-backup: FAILED" in failed.stderr
    assert time.time() - metric(env, "mlapi_backup_last_failure_timestamp_seconds") < 120
    assert metric(env, "mlapi_backup_snapshots") == 1  # the last good count stays


def test_an_unreachable_repository_fails_clearly_and_touches_nothing(backed_up: Environment) -> None:
    env = backed_up
    before = snapshot_of_data(env)
    target = env.client.containers.get(TARGET)
    target.stop(timeout=1)  # the Storage Box is down
    try:
        backup = env.ssh("/usr/local/sbin/mlapi-backup", check=False)
        restore = env.ssh("/usr/local/sbin/mlapi-restore latest", check=False)
    finally:
        target.start()
    for failed in (backup, restore):
        assert failed.returncode != 0
        assert "cannot reach the restic repository" in failed.stderr, failed.stderr
        assert TARGET_HOST in failed.stderr  # restic's own first line says which host it could not reach
    assert "mlapi-backup: FAILED" in backup.stderr
    assert snapshot_of_data(env) == before
    status, _, _, _ = env.https("/ready")
    assert status == 200  # the restore failed before it stopped anything


def test_restore_brings_back_the_snapshot_and_keeps_what_it_replaced(backed_up: Environment) -> None:
    env = backed_up
    env.ssh("/usr/local/sbin/mlapi-backup")  # a snapshot of a quiet stack, so the numbers below are exact
    at_backup = snapshot_of_data(env)
    serial = env.serial()
    predict_inside(env, 7)
    assert snapshot_of_data(env)[1] == at_backup[1] + 7
    restored = env.ssh("/usr/local/sbin/mlapi-restore latest")
    assert "restored latest" in restored.stdout
    ok, message = wait_healthy(
        f"https://{DOMAIN}/ready", attempts=360, delay=0.5, cacert=str(env.pebble_root), connect_to=env.standin.ip
    )
    assert ok, f"{message}\n{env.ssh('docker ps -a; docker service ps --no-trunc mlapi-model', check=False).stdout}"
    assert snapshot_of_data(env) == at_backup
    assert env.serial() == serial
    kept = env.ssh("ls -d /srv/mlapi/model.before-restore-*").stdout.split()
    assert len(kept) == 1  # the replaced data is kept, not deleted


def test_disaster_new_server_and_empty_volume_restore_everything(backed_up: Environment) -> None:
    env = backed_up
    before = snapshot_of_data(env)
    env.ssh("/usr/local/sbin/mlapi-backup")  # the newest state is in the repository
    serial, orders = env.serial(), env.pebble_orders()

    env.remove_server(graceful=True)  # the server is gone, and so is its volume
    env.client.volumes.get(env.data_volume).remove(force=True)
    env.data_volume = f"mlapi-standin-data-{uuid.uuid4().hex[:8]}"
    env.client.volumes.create(env.data_volume)
    env.boot()
    env.deploy()  # deploy step, credentials, restore onto the empty volume, then the stack

    assert "restored latest" in env.restore_output
    assert snapshot_of_data(env) == before
    assert env.serial() == serial, "the certificate came back with the volume"
    assert env.pebble_orders() == orders, "no new ACME order"
