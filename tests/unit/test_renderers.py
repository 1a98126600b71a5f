"""Pure renderers, tested without Pulumi: cloud-init, Traefik flags, labels, cron, smoke check."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from infra.host.cloud_init import (
    DOCKER_CE_PACKAGES,
    PREPARE_SCRIPT,
    READINESS_COMMAND,
    HostKey,
    prepare_host_script,
    render_user_data,
    user_data_document,
)
from infra.host.setup import (
    CRON_FILE,
    LOGROTATE_FILE,
    host_files,
    render_graceful_stop,
    render_host_setup,
    render_platform_check,
)
from infra.ops.smoke import wait_healthy
from infra.spec.acme import LETSENCRYPT_STAGING
from infra.spec.docker_api import DOCKER_API_CONTAINER, DOCKER_API_VOLUME, allowed_path_regex, docker_api_config
from infra.spec.durations import go_duration
from infra.spec.inputs import StackInputs, check_cron
from infra.spec.stack import APP_COMMAND, MODEL_UID, TRAEFIK_UID, build_stack, source_tag
from infra.spec.traefik import acme_storage, go_runtime_env, traefik_flags
from tests.support.shims import shim_dir

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDLpmSenSMqSDvSFdAqQgtlaOqlopDyCgvc7ldJdpEPP operator@example"
INPUTS = StackInputs(domain="api.example.com", acme_email="ops@example.com")
SPEC = build_stack(INPUTS)


def render(**kwargs) -> str:
    return render_user_data(
        SPEC, ssh_public_key=KEY, data_root="/srv/mlapi", volume_device="/dev/disk/by-id/scsi-0HC_Volume_42", **kwargs
    )


def cloud_init_schema(path: Path) -> subprocess.CompletedProcess:
    if shutil.which("cloud-init") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's cloud-init (see .ci/run)")
        pytest.skip("SKIPPED LOUDLY: cloud-init is not installed (apt-get install cloud-init)")
    return subprocess.run(["cloud-init", "schema", "--config-file", str(path)], capture_output=True, text=True)


@pytest.mark.parametrize("docker_source", ["docker-ce", "debian"])
def test_user_data_passes_cloud_init_schema(tmp_path: Path, docker_source: str) -> None:
    path = tmp_path / "user-data"
    path.write_text(render(docker_source=docker_source))
    result = cloud_init_schema(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid" in result.stdout


def test_schema_check_catches_a_broken_document(tmp_path: Path) -> None:
    """The schema check is not a rubber stamp: a wrong type is reported."""
    document = yaml.safe_load(render())
    document["ssh_pwauth"] = {"not": "a bool"}
    path = tmp_path / "user-data"
    path.write_text("#cloud-config\n" + yaml.safe_dump(document))
    assert cloud_init_schema(path).returncode != 0


def test_stand_in_variant_differs_only_in_the_docker_block() -> None:
    production = yaml.safe_load(render())
    standin = yaml.safe_load(render(docker_source="debian"))
    assert production.pop("apt")["sources"]["docker.list"]["keyid"]
    assert "apt" not in standin
    production_packages = production.pop("packages")
    standin_packages = standin.pop("packages")
    assert [p for p in production_packages if p not in DOCKER_CE_PACKAGES] == [
        p for p in standin_packages if p != "docker.io"
    ]
    assert "docker.io" in standin_packages and not set(DOCKER_CE_PACKAGES) & set(standin_packages)
    assert production == standin


def test_user_data_contents() -> None:
    document = yaml.safe_load(render())
    assert document["ssh_pwauth"] is False and document["disable_root"] is False
    files = {f["path"]: f["content"] for f in document["write_files"]}
    daemon = yaml.safe_load(files["/etc/docker/daemon.json"])
    assert daemon == {"log-driver": "json-file", "log-opts": {"max-size": "10m", "max-file": "5"}}
    assert "PasswordAuthentication no" in files["/etc/ssh/sshd_config.d/10-mlapi.conf"]
    assert 'Unattended-Upgrade "1"' in files["/etc/apt/apt.conf.d/20auto-upgrades"]
    assert "unattended-upgrades" in document["packages"]
    assert "logrotate" in document["packages"] and "cron" in document["packages"]
    assert "scsi-0HC_Volume_42" in files[PREPARE_SCRIPT]
    assert document["runcmd"] == [[PREPARE_SCRIPT]]
    # What changes later is not here: cloud-init runs once, and changing user-data replaces the server.
    assert CRON_FILE not in files and LOGROTATE_FILE not in files and APP_COMMAND not in files
    # Containers are kept from the metadata service (it serves user-data, which holds the host key).
    assert "DOCKER-USER -d 169.254.169.254/32 -j REJECT" in files[PREPARE_SCRIPT]
    no_metadata = files["/etc/systemd/system/docker.service.d/20-mlapi-no-metadata.conf"]
    assert no_metadata.startswith("[Service]\nExecStartPost=") and "169.254.169.254" in no_metadata


def test_host_key_is_installed_and_the_only_one() -> None:
    key = HostKey("-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----\n", "ssh-ed25519 AAAA k")
    document = yaml.safe_load(render(host_key=key))
    assert document["ssh_keys"] == {"ed25519_private": key.private_openssh, "ed25519_public": key.public_openssh}
    assert document["ssh_deletekeys"] is True
    assert "ssh_keys" not in yaml.safe_load(render())


def test_only_boot_settings_are_in_user_data() -> None:
    """Two stacks that differ only in what may change later render the same user-data (no server replacement)."""
    other = build_stack(INPUTS.model_copy(update={"retrain_schedule": "@daily", "model_replicas": 5}))
    same = render_user_data(
        other, ssh_public_key=KEY, data_root="/srv/mlapi", volume_device="/dev/disk/by-id/scsi-0HC_Volume_42"
    )
    assert same == render()
    assert render_host_setup(other) != render_host_setup(SPEC)
    cron = next(item for item in host_files(other) if item.path == CRON_FILE)
    assert "@daily root /usr/local/bin/mlapi-app retrain >> /var/log/mlapi-retrain.log 2>&1" in cron.content


def test_host_setup_installs_files_and_joins_swarm_idempotently(tmp_path: Path) -> None:
    """Run the deploy step's file part for real into a scratch root: files land with their content and modes."""
    script = render_host_setup(SPEC)
    assert "docker swarm init --advertise-addr 127.0.0.1 --listen-addr 127.0.0.1:2377" in script
    assert 'LocalNodeState}}")" != active' in script  # only when not already a swarm node
    files_only = script.split("mkdir -p /srv/mlapi/model")[0]
    for item in host_files(SPEC):
        parent = item.path.rsplit("/", 1)[0]
        files_only = files_only.replace(item.path, str(tmp_path) + item.path)
        files_only = files_only.replace(f"mkdir -p {parent}\n", f"mkdir -p {tmp_path}{parent}\n")
    for _ in range(2):
        subprocess.run(["sh", "-c", files_only], check=True)
    for item in host_files(SPEC):
        written = tmp_path / item.path.lstrip("/")
        assert written.read_text() == item.content
        assert oct(stat.S_IMODE(written.stat().st_mode)) == "0o" + item.mode.lstrip("0")


@pytest.mark.stack
def test_platform_check_refuses_an_image_for_another_platform() -> None:
    """The rendered check, run for real against an image on this engine: the wrong platform stops the deploy with
    what to do, the right one passes."""
    from infra.local.images import build_base
    from testbed.stack import docker_engine

    client = docker_engine()
    image = build_base(client)  # built here once, reused by the stack tests
    native = "linux/" + client.images.get(image).attrs["Architecture"]
    other = "linux/arm64" if native != "linux/arm64" else "linux/amd64"
    wrong = subprocess.run(["sh", "-c", render_platform_check(image, other, "cax11")], capture_output=True, text=True)
    assert wrong.returncode == 1
    assert f"is built for {native}, but serverType cax11 runs {other}" in wrong.stderr
    assert f"docker buildx build --platform {other}" in wrong.stderr
    right = subprocess.run(["sh", "-c", render_platform_check(image, native, "cx23")], capture_output=True, text=True)
    assert right.returncode == 0, right.stderr


def test_graceful_stop_removes_the_service_waits_and_unmounts() -> None:
    script = render_graceful_stop("/srv/mlapi")
    assert "MODEL_SERVICE=mlapi-model\nTRAEFIK_CONTAINER=mlapi-traefik\nDATA_ROOT=/srv/mlapi\n" in script
    assert script.index('docker service rm "$MODEL_SERVICE"') < script.index(
        'docker stop --time 10 "$TRAEFIK_CONTAINER"'
    )
    assert script.index("sync") < script.index('umount "$DATA_ROOT"')


def test_prepare_script_lays_out_the_data_directories(host_root: Path, tmp_path: Path) -> None:
    """Run the script for real on an already-mounted path (what the stand-in sees): it lays out dirs (and would
    block the metadata service where Docker runs)."""
    root = host_root / "srv"
    spec = build_stack(INPUTS.model_copy(update={"data_root": str(root)}))
    script = tmp_path / "prepare"
    script.write_text(prepare_host_script(spec, str(root), volume_device=None))
    script.chmod(0o755)
    for _ in range(2):  # idempotent
        subprocess.run([str(script)], check=True)
    model = (root / "model").stat()
    assert (model.st_uid, stat.S_IMODE(model.st_mode)) == (MODEL_UID, 0o750)
    assert stat.S_IMODE((root / "traefik").stat().st_mode) == 0o700


def test_prepare_script_fails_clearly_when_the_volume_never_appears(tmp_path: Path) -> None:
    script = prepare_host_script(SPEC, str(tmp_path / "data"), "/dev/disk/by-id/does-not-exist")
    script = script.replace("-lt 300", "-lt 1")
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
    assert result.returncode == 1
    assert "data volume /dev/disk/by-id/does-not-exist did not appear" in result.stderr


def test_docker_waits_for_the_data_volume_after_a_reboot() -> None:
    files = {f["path"]: f["content"] for f in yaml.safe_load(render())["write_files"]}
    drop_in = files["/etc/systemd/system/docker.service.d/10-mlapi-data-volume.conf"]
    assert drop_in == "[Unit]\nRequiresMountsFor=/srv/mlapi\n"
    assert "nofail" in files[PREPARE_SCRIPT]  # the VM itself still boots (and takes SSH) without the volume
    without_volume = user_data_document(SPEC, ssh_public_key=KEY, data_root="/srv/mlapi", volume_device=None)
    assert not any("data-volume" in f["path"] for f in without_volume["write_files"])


def test_user_data_renders_for_the_config_only() -> None:
    document = user_data_document(SPEC, ssh_public_key=KEY, data_root="/srv/mlapi", volume_device=None)
    assert "DEVICE=" not in next(f for f in document["write_files"] if f["path"] == PREPARE_SCRIPT)["content"]


def test_each_ca_has_its_own_certificate_store() -> None:
    """Switching staging → production (or any CA) must not keep serving the old CA's certificate."""
    stores = {acme_storage(ca) for ca in (LETSENCRYPT_STAGING, INPUTS.ca_server, "https://pebble:14000/dir")}
    assert len(stores) == 3
    assert "--certificatesresolvers.letsencrypt.acme.storage=/acme/letsencrypt.json" in traefik_flags(INPUTS, "mlapi")
    staging = INPUTS.model_copy(update={"acme_staging": True})
    staging_store = "--certificatesresolvers.letsencrypt.acme.storage=/acme/letsencrypt-staging.json"
    assert staging_store in traefik_flags(staging, "mlapi")


@pytest.mark.parametrize(
    ("seconds", "spelled"),
    [(0, "0s"), (0.1, "100ms"), (2, "2s"), (30, "30s"), (60, "1m0s"), (90, "1m30s"), (600, "10m0s"), (3661, "1h1m1s")],
)
def test_durations_are_spelled_as_go_prints_them(seconds: float, spelled: str) -> None:
    assert go_duration(seconds) == spelled


def test_traefik_flags_switch_ca_and_trust() -> None:
    local = StackInputs(
        domain="api.localtest",
        acme_email="ops@example.com",
        acme_ca_server="https://pebble:14000/dir",
        acme_ca_bundle="/tmp/ca.pem",
    )
    flags = traefik_flags(local, "mlapi")
    assert "--certificatesresolvers.letsencrypt.acme.caserver=https://pebble:14000/dir" in flags
    assert "--certificatesresolvers.letsencrypt.acme.cacertificates=/etc/mlapi/acme-ca.pem" in flags
    assert not any("cacertificates" in f for f in traefik_flags(INPUTS, "mlapi"))
    mounts = build_stack(local).traefik.mounts
    assert mounts[-1].source == "/tmp/ca.pem" and mounts[-1].read_only
    assert len(build_stack(INPUTS).traefik.mounts) == len(mounts) - 1


def test_traefiks_collector_fits_its_container_with_the_buffering_tmpfs() -> None:
    """GOMEMLIMIT is Traefik's memory limit less the tmpfs the buffering middleware spills to (same cgroup) and room
    for what Go does not manage; the container's tmpfs is that size; a limit too small to leave a heap is refused."""
    traefik = build_stack(INPUTS).traefik
    assert traefik.env["GOGC"] == "400"
    limit_mb = traefik.confinement.memory_bytes // 2**20
    tmpfs_mb = traefik.confinement.tmpfs_bytes // 2**20
    assert traefik.env["GOMEMLIMIT"] == f"{limit_mb - tmpfs_mb - 32}MiB" == "160MiB"
    with pytest.raises(ValueError, match="Traefik's memory limit 150 MiB leaves 54 MiB"):
        go_runtime_env(150)


@pytest.mark.parametrize("good", ["0 * * * *", "*/15 2-4 * * 1-5", "5,35 * 1 1,6 0", "@hourly", " 0  3 * * * "])
def test_cron_accepts(good: str) -> None:
    assert check_cron(good) == " ".join(good.split())


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("* * * *", "5 fields"),
        ("60 * * * *", "minute"),
        ("0 24 * * *", "hour"),
        ("0 0 0 * *", "day-of-month"),
        ("*/0 * * * *", "step"),
        ("a * * * *", "numbers"),
        ("0 0 * 13 *", "month"),
    ],
)
def test_cron_rejects(bad: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        check_cron(bad)


def test_source_tag_follows_the_build_context(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    first = source_tag(tmp_path)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "a.pyc").write_bytes(b"junk")
    assert source_tag(tmp_path) == first
    (tmp_path / "a.py").write_text("x = 2\n")
    assert source_tag(tmp_path) != first


def test_smoke_check_fails_with_hints_when_nothing_answers() -> None:
    said: list[str] = []
    ok, message = wait_healthy("https://127.0.0.1:9/health", attempts=2, delay=0, timeout=1, progress=said.append)
    assert not ok
    assert "after 2 attempts" in message and "DNS" in message and "docker logs mlapi-traefik" in message
    # Each attempt is told as it fails, with why: the wait is never silent.
    assert [line.split(" after ")[0] for line in said] == ["smoke check 1/2", "smoke check 2/2"]
    assert all("ConnectionRefusedError" in line for line in said) and "next in 0 s" in said[0]


def test_the_cloud_init_wait_tells_each_stage_once(tmp_path: Path) -> None:
    """The wait step, run for real against a cloud-init that goes through two stages and finishes."""
    states = tmp_path / "states"
    states.write_text(
        "status: running\ndetail: init-local\n---\nstatus: running\ndetail: init-local\n---\n"
        "status: running\ndetail: modules:final\n---\nstatus: done\ndetail: DataSourceHetzner\n"
    )
    shims = shim_dir(tmp_path / "bin", {
        # `status --long` prints the next record of the file each call; `status --wait` returns at once.
        "cloud-init": f'[ "$2" = --wait ] && exit 0\nf={states}\nsed -n "1,/^---$/p" "$f" | grep -v "^---$"\n'
                      'sed -i "1,/^---$/d" "$f"',
        "docker": "exit 0",
        "sleep": "exit 0",
    })  # fmt: skip
    result = subprocess.run(["sh", "-c", READINESS_COMMAND], capture_output=True, text=True,
                            env={**os.environ, "PATH": f"{shims}:{os.environ['PATH']}"}, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.rsplit(" (", 1)[0] for line in lines] == [
        "cloud-init: running init-local",
        "cloud-init: running modules:final",
        "cloud-init done",
    ], lines


def test_backup_scripts_parse_and_carry_the_settings() -> None:
    from infra.host.backup import backup_script, host_setup_parts, restore_script
    from infra.spec.backup import BackupSettings

    settings = BackupSettings("s3:https://s3.example.com/bucket", "5 4 * * *", 2, 3, 4)
    for script in (backup_script("/srv/mlapi", settings), restore_script("/srv/mlapi")):
        assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0
    backup = backup_script("/srv/mlapi", settings)
    assert "KEEP='--keep-daily 2 --keep-weekly 3 --keep-monthly 4'\n" in backup and "$KEEP --prune" in backup
    # a consistent copy, as the right owner: the real .py file, run as the model's uid
    assert "source.backup(target)" in backup and "MODEL_UID=10001\n" in backup
    assert 'setpriv --reuid="$MODEL_UID"' in backup and 'python3 -c "$SQLITE_BACKUP_PY"' in backup
    files, commands = host_setup_parts(settings, "/srv/mlapi")
    assert "apt-get install -y -qq restic" in commands
    cron = next(f for f in files if f.path == "/etc/cron.d/mlapi-backup").content
    assert "5 4 * * * root /usr/local/sbin/mlapi-backup >> /var/log/mlapi-backup.log 2>&1" in cron
    assert "rm -f /etc/cron.d/mlapi-backup" in host_setup_parts(None, "/srv/mlapi")[1]


def test_credentials_installer_writes_root_only_files_from_stdin(tmp_path: Path) -> None:
    """The installer the program runs, for real, into a scratch root: files from stdin, mode 0600."""
    from infra.host.backup import INSTALL_CREDENTIALS, credentials_bundle
    from infra.spec.backup import BackupSettings

    settings = BackupSettings("sftp:u@box.example.com:/m", "30 2 * * *", sftp_host="box.example.com", sftp_port=23)
    bundle = credentials_bundle(
        settings, "pa ss'word", {"X_KEY": "v"}, "-----BEGIN OPENSSH PRIVATE KEY-----\nk\n", None
    )
    bundle = bundle.replace(" /etc/", f" {tmp_path}/etc/").replace("/etc/", f"{tmp_path}/etc/", 0)
    lines = [f"{tmp_path}{line}" if line.startswith("/") else line for line in bundle.splitlines()]
    script = INSTALL_CREDENTIALS.replace("/etc/mlapi/backup", f"{tmp_path}/etc/mlapi/backup").rsplit("\n", 2)[0]
    subprocess.run(["sh", "-c", script], input="\n".join(lines) + "\n", text=True, check=True)
    env_file = tmp_path / "etc/mlapi/backup/env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    sourced = subprocess.run(
        ["sh", "-c", f'set -a; . {env_file}; echo "$RESTIC_PASSWORD|$RESTIC_REPOSITORY|$X_KEY"'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert sourced.stdout.strip() == "pa ss'word|sftp:u@box.example.com:/m|v"
    ssh_config = (tmp_path / "etc/ssh/ssh_config.d/60-mlapi-backup.conf").read_text()
    assert "Host box.example.com" in ssh_config and "Port 23" in ssh_config
    assert "StrictHostKeyChecking accept-new" in ssh_config  # no known hosts given


def test_the_edge_tls_options_are_mozilla_intermediate_and_written_by_the_layout(tmp_path: Path) -> None:
    from infra.spec.traefik import DYNAMIC_DIR, TLS12_CIPHERS, traefik_flags

    inputs = StackInputs(domain="api.example.com", acme_email="ops@example.com", data_root=str(tmp_path))
    spec = build_stack(inputs)
    [tls_file] = [item for item in spec.config_files if item.path.endswith("/tls.yml")]
    path, content = tls_file.path, tls_file.content
    assert path == f"{tmp_path}/traefik/dynamic/tls.yml" and tls_file.owner_uid == TRAEFIK_UID
    default = yaml.safe_load(content)["tls"]["options"]["default"]
    assert default["minVersion"] == "VersionTLS12" and default["sniStrict"] is True
    assert all("ECDHE" in suite and ("GCM" in suite or "CHACHA20" in suite) for suite in default["cipherSuites"])
    assert tuple(default["cipherSuites"]) == TLS12_CIPHERS
    flags = traefik_flags(inputs, "mlapi")
    assert f"--providers.file.directory={DYNAMIC_DIR}" in flags
    assert "--certificatesresolvers.letsencrypt.acme.keytype=EC256" in flags
    # The layout writes it (and every other generated file) as root would on the VM: tests/unit/test_host_links.py.


def test_only_the_docker_api_proxy_holds_the_socket_and_it_allows_only_reads() -> None:
    spec = build_stack(StackInputs(domain="api.example.com", acme_email="ops@example.com"))
    holders = [c.name for c in (spec.traefik, spec.docker_api) if any("docker.sock" in m.source for m in c.mounts)]
    assert holders == [DOCKER_API_CONTAINER]
    assert not any("docker.sock" in m.source for m in spec.model.mounts)
    assert "--providers.swarm.endpoint=unix:///run/mlapi-docker-api/docker.sock" in spec.traefik.command
    # Traefik: its own user, no capability at all; it and the proxy (no network at all) share the proxy's socket.
    assert spec.traefik.user == f"{TRAEFIK_UID}:{TRAEFIK_UID}" and spec.traefik.confinement.cap_add == ()
    assert spec.traefik.network == spec.network and spec.docker_api.network is None
    sharing = [c.name for c in (spec.traefik, spec.docker_api) for m in c.mounts if m.source == DOCKER_API_VOLUME]
    assert sharing == [spec.traefik.name, DOCKER_API_CONTAINER] and spec.volumes == (DOCKER_API_VOLUME,)
    assert "bind /run/mlapi-docker-api/docker.sock mode 666" in docker_api_config()
    assert {(p.host_port, p.container_port) for p in spec.traefik.ports} == {(80, 8880), (443, 8443)}
    assert spec.docker_api.ports == () and spec.docker_api.confinement.cap_add == ()
    allowed = re.compile(allowed_path_regex())
    for path in ("/_ping", "/v1.41/version", "/v1.44/services", "/services/abc", "/v1.24/tasks", "/networks/x"):
        assert allowed.match(path), path
    for path in (
        "/containers/json",
        "/v1.41/containers/create",
        "/exec/abc/start",
        "/services/abc/logs",
        "/secrets",
        "/info",
        "/v1.41/swarm/unlockkey",
        "/servicesx",
        "/v1.41/services/../containers/json",
    ):
        assert not allowed.match(path), path
    config = docker_api_config()
    assert "acl read_only method GET HEAD" in config
    assert "http-request deny deny_status 403 if !read_only || !listed" in config
