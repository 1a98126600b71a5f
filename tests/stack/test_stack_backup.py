"""Backups of the local stack, and operating it with `mlapi --local`. For real: `make local-backup`,
`make local-destroy`, `make local-up` on empty data,
`make local-restore` bring back the same logs, models and certificate with no new ACME order; a wrong password, an
unreachable repository and a full disk each fail clearly and change nothing; an S3 repository (moto's server on
127.0.0.1) works like the local one. `mlapi` (a real process, as an operator runs it) reports the healthy stack
and the failed backup, exports what was predicted, round-trips versions, shows logs and runs commands in a replica.

Its own stack (this module destroys the data on purpose); runs in CI, skips loudly elsewhere without an engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from docker.types import Mount

from infra.host.backup import ENV_FILE, STATUS_FILE, environment_lines, restore_script
from infra.local import backup as local_backup
from infra.local import cli as local_cli
from infra.local import stack as local
from infra.spec.stack import MODEL_UID
from testbed.stack import (
    TIMINGS,
    app_command,
    docker_engine,
    free_port,
    https,
    pebble_orders,
    pin_holdout_seed,
    promote,
    promote_with_fresh_data,
    tasks,
    wait_until,
)
from tests.support.service import FEATURES, record

pytestmark = pytest.mark.stack
COUNT_ROWS = (
    "import sqlite3; db = sqlite3.connect('/data/predictions.sqlite3'); "
    "print(*(db.execute(f'select count(*) from {t}').fetchone()[0] for t in ('predictions', 'observations')))"
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local.LocalStack]:
    docker_engine()
    local.down(quiet=True)  # the names are the production ones
    root = tmp_path_factory.mktemp("backup-stack")
    options = local.LocalOptions.isolated(root, free_port(), free_port())
    pin_holdout_seed(options.data_root)
    try:
        yield local.up(options, quiet=True)
    finally:
        local.down(options, delete_data=True, quiet=True)


def backups(stack: local.LocalStack, **changes) -> local_backup.LocalBackupOptions:
    return replace(local_backup.LocalBackupOptions(stack.options.backup_dir), **changes)


def state_of(stack: local.LocalStack) -> dict:
    """What a restore must bring back: row counts, model versions and the current one."""
    client = docker_engine()
    counted = tasks(client)[0].exec_run(["python", "-c", COUNT_ROWS]).output.decode().split()
    versions = json.loads(app_command(stack, "versions").stdout)
    return {
        "predictions": int(counted[0]),
        "observations": int(counted[1]),
        "versions": sorted(v["version"] for v in versions["versions"]),
        "current": versions["current"],
    }


def served_certificate(stack: local.LocalStack, cafile: Path) -> str:
    """SHA-256 of the certificate Traefik serves, after verifying its chain against ``cafile``."""
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", stack.options.https_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=stack.options.domain) as tls,
    ):
        return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


def data_fingerprint(stack: local.LocalStack) -> list[str]:
    """Names, sizes and times of every file in the data root (not the status file the failure updates, not the
    live log, not the monitoring's own data, which Prometheus and Alertmanager write all the time and backups leave
    out): any change a failed restore made shows here."""
    listing = subprocess.run(
        ["find", str(stack.options.data_root), "-type", "f", "-printf", "%P %s %T@\\n"], capture_output=True, text=True
    ).stdout
    live = ("predictions.sqlite3", STATUS_FILE)
    monitoring = ("prometheus/data/", "alertmanager/")
    return sorted(
        line
        for line in listing.splitlines()
        if not any(part in line for part in live) and not line.startswith(monitoring)
    )


def plant_project_log(directory: Path, rows: int) -> Path:
    """A model project's own prediction log (app/stores.py keeps one per project under projects/), owned by the
    service's user as the replicas would leave it."""
    directory.mkdir(parents=True)
    path = directory / "predictions.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as database:
        database.execute("create table predictions (id integer primary key)")
        database.executemany("insert into predictions values (?)", [(i,) for i in range(rows)])
        database.commit()
    for item in (directory.parent, directory, path):
        os.chown(item, MODEL_UID, MODEL_UID)
    return path


PROJECT_DIR = Path(__file__).resolve().parents[2]


def mlapi_environment(stack: local.LocalStack) -> dict[str, str]:
    """What points `mlapi --local` at this test's stack, as an operator's environment would."""
    return {
        **os.environ,
        "MLAPI_LOCAL_DIR": str(stack.options.data_root.parent),
        "MLAPI_LOCAL_HTTPS_PORT": str(stack.options.https_port),
        "MLAPI_LOCAL_HTTP_PORT": str(stack.options.http_port),
    }


def mlapi(stack: local.LocalStack, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`mlapi --local …` in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "infra.ops", "--local", *args],
        capture_output=True,
        text=True,
        env=mlapi_environment(stack),
        cwd=PROJECT_DIR,
        timeout=timeout,
    )


def test_mlapi_status_of_the_healthy_stack_is_0_and_says_what_serves(stack: local.LocalStack) -> None:
    result = mlapi(stack, "status", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    status = json.loads(result.stdout)
    assert status["problems"] == [] and status["desired"] == 2
    assert [r["state"].split()[0] for r in status["replicas"]] == ["Running", "Running"]
    assert {r["version"] for r in status["replicas"]} == {"v0001"} == {status["current_version"]}
    assert all("rmse" in r["metrics"] for r in status["replicas"])
    assert status["certificate"]["issuer"].startswith("Pebble") and status["certificate"]["days_left"] > 14
    assert status["disk"]["free"] > 0 and status["backup"] is None
    # The stack's Prometheus answered (from a replica, over the overlay): nothing firing, the edge counted.
    assert status["alerts"] == [] and set(status["edge"]) == {"requests_1h", "errors_5xx_1h"}
    text = mlapi(stack, "status")
    assert text.returncode == 0 and "healthy" in text.stdout and "v0001" in text.stdout, text.stdout
    assert "alerts firing: 0" in text.stdout and "edge, last hour:" in text.stdout, text.stdout


def test_mlapi_predictions_exports_what_was_sent_with_its_ground_truth(stack: local.LocalStack, tmp_path: Path) -> None:
    sent = [record(age=round(0.001 * i, 6), sex=0.05) for i in range(1, 21)]
    ids = []
    for row in sent:
        status, _, body = https(stack, "POST", "/predict", {"features": row})
        assert status == 200, body
        ids.append(json.loads(body)["prediction_id"])
    ingest = {"Authorization": f"Bearer {(stack.options.state_dir / 'ingest-token').read_text().strip()}"}
    truth = {"observations": [{"prediction_id": ids[3], "target": 123.5}]}
    assert https(stack, "POST", "/observations", truth, headers=ingest)[0] == 201
    exported = tmp_path / "predictions.jsonl"
    result = mlapi(stack, "predictions", "--since", "10m", "--format", "jsonl", "-o", str(exported))
    assert result.returncode == 0, result.stderr
    rows = {row["id"]: row for row in map(json.loads, exported.read_text().splitlines())}
    assert [rows[i]["features"] for i in ids] == sent
    assert [rows[i]["observed"] for i in ids] == [None, None, None, 123.5] + [None] * 16
    table = mlapi(stack, "predictions", "--since", "10m")  # CSV on standard output
    assert table.returncode == 0 and table.stdout.splitlines()[0].startswith("id,time,model_version,prediction")
    assert all(i in table.stdout for i in ids)
    parquet = mlapi(stack, "predictions", "--since", "10m", "--format", "parquet", "-o", str(tmp_path / "day.parquet"))
    assert parquet.returncode == 0 and "rows written to" in parquet.stderr, parquet.stderr
    columns = pq.read_table(tmp_path / "day.parquet").to_pydict()
    by_id = dict(zip(columns["id"], range(len(columns["id"])), strict=True))
    assert [{name: columns[f"features.{name}"][by_id[i]] for name in sent[0]} for i in ids] == sent
    assert columns["observed"][by_id[ids[3]]] == 123.5 and not list(tmp_path.glob("*.part"))
    # The model report from the same replica: its training data and these rows (Chromium opens one in
    # tests/unit/test_report.py).
    page = tmp_path / "report.html"
    made = mlapi(stack, "report", "--since", "10m", "-o", str(page))
    assert made.returncode == 0, made.stderr
    assert f"{page}: diabetes, " in made.stdout and "(1 with ground truth) against 442 training rows" in made.stdout
    assert "Drift: recent predictions against the training data" in page.read_text()


def test_mlapi_exports_100k_rows_in_bounded_memory_on_both_sides(stack: local.LocalStack, tmp_path: Path) -> None:
    """Rows planted in the replicas' SQLite file, exported through a replica to a file here: the replica's memory
    and mlapi's own stay where a 1,000-row export leaves them."""
    database = stack.options.data_root / "model" / "predictions.sqlite3"
    features = json.dumps([0.01] * len(FEATURES))
    with sqlite3.connect(database, timeout=30) as db:
        db.executemany(
            "INSERT INTO predictions VALUES (?,?,?,?,?,?,?,?,?,?)",
            [(f"planted-{i:06d}", 1.0 + i, "v0001", features, 1.0, 0.5, 1.5, 0.9, 0, 1.0) for i in range(100_000)],
        )
    client = docker_engine()

    def replica_peaks() -> int:
        """The serving processes' high-water marks (KiB): the largest moment of each replica's life (PID 1 is the
        container's init; the largest process is the service)."""
        total = 0
        for task in tasks(client):
            status = task.exec_run(["sh", "-c", "cat /proc/[0-9]*/status"]).output.decode()
            total += max(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        return total

    def export(since: str) -> tuple[int, int, int]:
        """Lines, mlapi's peak RSS and the replicas' high-water marks (KiB) after one export."""
        out, peak = tmp_path / "export.csv", tmp_path / "peak"
        command = [sys.executable, "-m", "infra.ops", "--local", "predictions", "--since", since, "-o", str(out)]
        # /usr/bin/time reports mlapi's own peak: pytest's fork would count pytest's memory as the child's.
        timed = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", str(peak), *command],
            env=mlapi_environment(stack),
            cwd=PROJECT_DIR,
            capture_output=True,
            text=True,
        )
        assert timed.returncode == 0, timed.stderr
        with out.open() as lines:
            return sum(1 for _ in lines), int(peak.read_text().split()[-1]), replica_peaks()

    small_lines, small_rss, small_replicas = export("10m")  # the planted rows are from 1970: not these
    large_lines, large_rss, large_replicas = export("30000d")  # every row since 1970
    assert large_lines >= 100_001 > small_lines
    TIMINGS.append(
        f"mlapi predictions: {large_lines - 1} rows; mlapi's peak RSS {large_rss / 1024:.0f} MiB (vs "
        f"{small_rss / 1024:.0f} MiB for {small_lines - 1} rows); replicas' high-water marks "
        f"{large_replicas / 1024:.0f} MiB after (vs {small_replicas / 1024:.0f} MiB)"
    )
    assert large_rss < small_rss + 16 * 1024, "mlapi held the export in memory"
    assert large_replicas < small_replicas + 32 * 1024, "a replica held the export in memory"
    with sqlite3.connect(database, timeout=30) as db:
        db.execute("DELETE FROM predictions WHERE id LIKE 'planted-%'")


def test_mlapi_versions_retrain_and_rollback_round_trip(stack: local.LocalStack) -> None:
    ingest = {"Authorization": f"Bearer {(stack.options.state_dir / 'ingest-token').read_text().strip()}"}
    before = json.loads(mlapi(stack, "versions", "--json").stdout)

    def retrain() -> dict:
        result = mlapi(stack, "retrain")
        # Its phases as they happened (stderr), the outcome as JSON (stdout).
        assert "] training a candidate on " in result.stderr and "retrain [" in result.stderr, result.stderr
        return json.loads(result.stdout)

    promoted = promote_with_fresh_data(
        lambda rows: https(stack, "POST", "/observations", {"observations": rows}, headers=ingest)[0], retrain
    )
    after = json.loads(mlapi(stack, "versions", "--json").stdout)
    assert after["current"] == promoted["candidate_version"] != before["current"]
    assert after["history"][-1]["outcome"] == "promoted"
    table = mlapi(stack, "versions")
    assert table.returncode == 0 and promoted["candidate_version"] in table.stdout and "promoted" in table.stdout
    back = mlapi(stack, "rollback", before["current"])
    assert back.returncode == 0 and json.loads(back.stdout)["current"] == before["current"], back.stderr
    assert json.loads(mlapi(stack, "versions", "--json").stdout)["current"] == before["current"]
    forward = mlapi(stack, "promote", promoted["candidate_version"])  # and forward again, by hand
    assert forward.returncode == 0 and json.loads(forward.stdout)["current"] == promoted["candidate_version"]
    assert mlapi(stack, "rollback", before["current"]).returncode == 0
    wait_until(
        lambda: json.loads(mlapi(stack, "status", "--json").stdout)["problems"] == [],
        60,
        "every replica serving the rolled-back version",
    )
    drift = mlapi(stack, "drift", "--window", "50")
    assert drift.returncode == 0 and set(json.loads(drift.stdout)["psi"]) == set(FEATURES)


def test_mlapi_logs_show_a_line_written_in_a_replica_and_exec_runs_as_its_user(stack: local.LocalStack) -> None:
    marker = f"mlapi-log-marker-{time.time_ns()}"
    replica = tasks(docker_engine())[0]
    assert replica.exec_run(["sh", "-c", f"echo {marker} > /proc/1/fd/1"]).exit_code == 0
    wait_until(lambda: marker in mlapi(stack, "logs", "model", "--since", "5m").stdout, 30, "the line in the logs")
    edge = mlapi(stack, "logs", "edge", "--since", "1h")
    assert edge.returncode == 0 and edge.stdout.strip(), edge.stderr
    who = mlapi(stack, "exec", "--", "id", "-u")
    assert who.returncode == 0 and who.stdout.strip() == str(MODEL_UID), who.stderr


@pytest.mark.parametrize(
    ("which", "path", "says"),
    [
        ("prometheus", "/api/v1/targets?state=active", '"job":"mlapi-model"'),
        ("alertmanager", "/api/v2/status", '"cluster"'),
    ],
)
def test_mlapi_ui_brings_a_monitoring_ui_published_nowhere_to_this_machine(
    stack: local.LocalStack, which: str, path: str, says: str
) -> None:
    """`mlapi ui`: Prometheus' and Alertmanager's own web servers at 127.0.0.1 here, each connection carried into a
    model replica on their network; neither service publishes a port."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "infra.ops", "--local", "ui", which, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mlapi_environment(stack), cwd=PROJECT_DIR,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        told = process.stdout.readline()
        assert f"{which} of the local stack: http://127.0.0.1:{port}/" in told, told + process.stderr.read()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            answer = client.get(path)
            assert answer.status_code == 200 and says in answer.text.replace(" ", ""), answer.text[:500]
            # Its pages too on the VM; Debian's builds, which the local stack runs, leave the web pages out.
            assert client.get("/-/healthy").status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(30)
    assert code == 0, process.stderr.read() if process.stderr else ""
    service = {"prometheus": "mlapi-prometheus", "alertmanager": "mlapi-alertmanager"}[which]
    assert not docker_engine().api.inspect_service(service).get("Endpoint", {}).get("Ports")


def test_backup_destroy_up_restore_brings_back_data_and_certificate(stack: local.LocalStack) -> None:
    client = docker_engine()
    initially = state_of(stack)
    logged = initially["predictions"]
    for age in (0.01, 0.02, 0.03):
        assert https(stack, "POST", "/predict", {"features": record(age=age)})[0] == 200
    promote(stack)
    # The prediction log writes in the background: wait for the rows themselves.
    wait_until(lambda: state_of(stack)["predictions"] >= logged + 3, 30, "3 new rows in the prediction log")
    before = state_of(stack)
    assert before["predictions"] >= 3 and before["observations"] >= 354
    assert len(before["versions"]) == len(initially["versions"]) + 1  # the promotion
    project_log = plant_project_log(stack.options.data_root / "model" / "projects" / "penguins-0123456789ab", 7)
    old_root = stack.options.state_dir / "acme-store-root.pem"
    saved_root = stack.options.backup_dir.parent / "root-at-backup.pem"
    saved_root.write_bytes(old_root.read_bytes())
    certificate = served_certificate(stack, saved_root)

    started = time.monotonic()
    said = local_cli.backup_or_restore(stack.options, "backup")
    assert said == 0
    backup_s = time.monotonic() - started

    local.down(stack.options, delete_data=True, quiet=True)  # `make local-destroy`
    assert not stack.options.data_root.exists()
    assert (stack.options.backup_dir / "password").exists(), "local-destroy keeps the backup repository"
    fresh = local.up(stack.options, quiet=True)  # `make local-up` on empty data: a new Pebble, a new certificate
    empty = state_of(fresh)
    assert empty["predictions"] == 0 and len(empty["versions"]) == 1
    orders = pebble_orders(client)
    assert served_certificate(fresh, fresh.ca_root) != certificate

    started = time.monotonic()
    lines = local_backup.restore_and_check(
        client,
        backups(fresh),
        fresh.options.data_root,
        fresh.options.state_dir,
        "latest",
        f"https://{fresh.options.domain}:{fresh.options.https_port}/ready",
    )
    restore_s = time.monotonic() - started
    assert any("serves the restored data" in line for line in lines), lines
    assert state_of(fresh) == before
    with contextlib.closing(sqlite3.connect(project_log)) as restored:  # a model project's log, by SQLite's backup
        assert restored.execute("select count(*) from predictions").fetchone()[0] == 7
    assert served_certificate(fresh, saved_root) == certificate, "the same certificate, verified"
    assert (fresh.options.state_dir / "acme-store-root.pem").read_bytes() == saved_root.read_bytes()
    assert pebble_orders(client) == orders, "no new ACME order"
    assert len(list(fresh.options.data_root.glob("model.before-restore-*"))) == 1
    TIMINGS.append(f"local backup {backup_s:.1f} s; restore with stop and start {restore_s:.1f} s")

    again = local.up(fresh.options, quiet=True)  # the next up replaces a certificate of a root Pebble lost
    assert https(again, "GET", "/health")[0] == 200
    assert state_of(again) == before


def test_a_wrong_password_fails_clearly_and_changes_nothing(stack: local.LocalStack) -> None:
    assert local_cli.backup_or_restore(stack.options, "backup") == 0
    password = stack.options.backup_dir / "password"
    right = password.read_text()
    before = data_fingerprint(stack)
    password.write_text("not the password the repository was made with")
    try:
        with pytest.raises(local_backup.LocalBackupError, match=r"password does not open it \(fix: \.local/backup"):
            local_backup.restore(docker_engine(), backups(stack), stack.options.data_root, stack.options.state_dir)
    finally:
        password.write_text(right)
    assert data_fingerprint(stack) == before
    wait_until(lambda: https(stack, "GET", "/ready")[0] == 200, 120, "the stack serving again after the failure")


def test_an_unreachable_repository_fails_clearly_and_changes_nothing(stack: local.LocalStack) -> None:
    nowhere = backups(stack, repository=f"rest:http://127.0.0.1:{free_port()}/")  # nothing listens there
    before = data_fingerprint(stack)
    client = docker_engine()
    unreachable = r"cannot reach the restic repository: .*connection refused"
    with pytest.raises(local_backup.LocalBackupError, match=unreachable):
        local_backup.backup(client, nowhere, stack.options.data_root, stack.options.state_dir)
    status = json.loads((stack.options.data_root / "model" / STATUS_FILE).read_text())
    assert status["last_failure_unixtime"] > status.get("last_success_unixtime", 0)  # what the gauges and status show
    assert "LAST RUN FAILED" in local_backup.last_backup(stack.options.data_root)
    reported = mlapi(stack, "status")
    assert reported.returncode == 1 and "problem: last backup failed at" in reported.stdout, reported.stdout
    with pytest.raises(local_backup.LocalBackupError, match="cannot reach the restic repository"):
        local_backup.restore(client, nowhere, stack.options.data_root, stack.options.state_dir)
    assert data_fingerprint(stack) == before
    wait_until(lambda: https(stack, "GET", "/ready")[0] == 200, 120, "the stack serving again after the failure")


def test_a_link_planted_in_the_model_directory_leads_the_root_backup_job_nowhere(stack: local.LocalStack) -> None:
    """The replicas own the model directory. The root backup job once wrote its status through a planted
    `backup-status.json.tmp` into whatever it named (the root-sourced env file: root on the host). Now the status is
    written as the model's user, to a fresh name: the link's target stays as it was, on success and on failure."""
    model = stack.options.data_root / "model"
    victim = stack.options.data_root / "root-only-file"  # root's, as /etc/mlapi/backup/env is on the VM
    victim.write_text("RESTIC_PASSWORD=kept\n")
    victim.chmod(0o600)
    link = model / f"{STATUS_FILE}.tmp"
    link.symlink_to(victim)
    os.chown(link, MODEL_UID, MODEL_UID, follow_symlinks=False)
    client = docker_engine()
    nowhere = backups(stack, repository=f"rest:http://127.0.0.1:{free_port()}/")
    try:
        with pytest.raises(local_backup.LocalBackupError, match="cannot reach the restic repository"):
            local_backup.backup(client, nowhere, stack.options.data_root, stack.options.state_dir)  # the EXIT trap
        assert local_cli.backup_or_restore(stack.options, "backup") == 0
        assert victim.read_text() == "RESTIC_PASSWORD=kept\n"
        info = victim.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o600)
        status = json.loads((model / STATUS_FILE).read_text())
        assert status["last_success_unixtime"] > status["last_failure_unixtime"] > 0
        assert (model / STATUS_FILE).stat().st_uid == MODEL_UID
    finally:
        link.unlink()
        victim.unlink()


def test_a_full_disk_fails_clearly_and_changes_nothing(stack: local.LocalStack) -> None:
    client = docker_engine()
    options = backups(stack)
    assert local_cli.backup_or_restore(stack.options, "backup") == 0
    before = data_fingerprint(stack)
    # The backup's staging area on a 64 KiB disk.
    with pytest.raises(
        local_backup.LocalBackupError, match=r"not enough space for the staging copy: .* nothing changed"
    ):
        local_backup.run_script(
            client,
            options,
            stack.options.data_root,
            stack.options.state_dir,
            local_backup.backup_script(str(stack.options.data_root), options.settings, local_backup.HINTS),
            [],
            tmpfs={"/var/lib/mlapi-backup": "size=64k"},
        )
    assert data_fingerprint(stack) == before
    # A restore onto a data volume that has live data and no room for the snapshot: the live data stays as it was.
    data = "/srv/mlapi"
    env_file = options.directory / "env"
    env_file.write_text(environment_lines(options.settings, local_backup.password(options), {}))
    live = (
        f"mkdir -p {data}/model/models/v0001 {data}/traefik && echo live > {data}/model/CURRENT && "
        f"head -c 1000000 /dev/zero > {data}/model/models/v0001/model.skops"
    )
    check = f"cat {data}/model/CURRENT; ls {data}; sha256sum {data}/model/models/v0001/model.skops"
    container = client.containers.run(
        local_backup.tool_image(client),
        ["sh", "-c", f'{live} && sh -c "$RESTORE" mlapi-restore latest; echo "exit=$?"; {check}'],
        detach=True,
        environment={"RESTORE": restore_script(data, local_backup.HINTS)},
        tmpfs={data: "size=1m"},
        mounts=[
            Mount(target=ENV_FILE, source=str(env_file), type="bind", read_only=True),
            Mount(target=local_backup.LOCAL_REPOSITORY, source=str(options.directory / "repo"), type="bind"),
        ],
    )
    container.wait()
    output = container.logs().decode()
    container.remove(force=True)
    assert "not enough space for the restored data on the data volume" in output and "nothing changed" in output
    assert "exit=1" in output
    lines = output.strip().splitlines()
    assert lines[-4:-1] == ["live", "model", "traefik"]
    assert lines[-1].split()[0] == hashlib.sha256(bytes(1000000)).hexdigest()


def test_an_s3_repository_backs_up_and_restores(stack: local.LocalStack, tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() is None, 30, "moto")
        s3 = backups(
            stack,
            repository=f"s3:http://127.0.0.1:{port}/mlapi-backups",
            environment={"AWS_ACCESS_KEY_ID": "test-key-id", "AWS_SECRET_ACCESS_KEY": "test-secret"},
        )
        client = docker_engine()
        out = local_backup.backup(client, s3, stack.options.data_root, stack.options.state_dir)
        assert "created the restic repository" in out and "snapshot saved (1 in the repository)" in out
        before = state_of(stack)
        assert https(stack, "POST", "/predict", {"features": record(age=0.04)})[0] == 200
        wait_until(lambda: state_of(stack)["predictions"] == before["predictions"] + 1, 30, "the new row in the log")
        local_backup.restore(client, s3, stack.options.data_root, stack.options.state_dir)
        wait_until(lambda: https(stack, "GET", "/ready")[0] == 200, 120, "the stack serving the restored data")
        assert state_of(stack) == before
    finally:
        server.terminate()
        server.wait(timeout=10)
