"""Backups of the local stack: ``python -m infra.local backup|restore`` (``make local-backup``/``local-restore``).

The same scripts the VM runs (infra/host/backup.py), run as root in a throwaway container with restic, the data root
mounted at its own path, and the host's network (so a repository on this machine or your LAN is reached the same way
restic on the host would). The repository defaults to .local/backup/repo with a password made on first use in
.local/backup/password; `make local-destroy` keeps both. Another repository: MLAPI_LOCAL_BACKUP_REPOSITORY (any
restic URL) and its credentials in MLAPI_LOCAL_BACKUP_ENV (a JSON object of environment variables).

One local extra goes into each snapshot: the Pebble root the stored certificates chain to. Pebble makes a new root
at every start, so after a restore the served certificate verifies against that saved root
(.local/state/acme-store-root.pem) until the next `make local-up` gets one from the running Pebble.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import docker
from docker.types import Mount

from infra.host.backup import ENV_FILE, STATUS_FILE, Hints, backup_script, environment_lines, restore_script
from infra.local import images
from infra.ops.smoke import wait_healthy
from infra.spec.backup import BackupSettings
from infra.spec.stack import MODEL_SERVICE, TRAEFIK_CONTAINER

LOCAL_REPOSITORY = "/backup/repo"  # inside the tool container: .local/backup/repo
STATE_MOUNT = "/state"
CA_ROOT = "acme-store-root.pem"  # in the state dir: written by `up`, carried in every snapshot
HINTS = Hints(
    key_fix=".local/backup/password, the password the repository was made with",
    repository_fix="MLAPI_LOCAL_BACKUP_REPOSITORY and MLAPI_LOCAL_BACKUP_ENV",
)


class LocalBackupError(RuntimeError):
    """A local backup or restore failed; the message holds what the script said."""


@dataclass(frozen=True)
class LocalBackupOptions:
    directory: Path
    repository: str | None = None  # None: a repository in directory/repo
    environment: dict[str, str] = field(default_factory=dict)
    keep_daily: int = 7
    keep_weekly: int = 4
    keep_monthly: int = 6

    @classmethod
    def from_environment(cls, directory: Path) -> LocalBackupOptions:
        raw = os.environ.get("MLAPI_LOCAL_BACKUP_ENV", "").strip()
        try:
            environment = json.loads(raw) if raw else {}
        except json.JSONDecodeError as exc:
            raise LocalBackupError(f"MLAPI_LOCAL_BACKUP_ENV is not a JSON object ({exc.msg})") from None
        if not isinstance(environment, dict) or not all(
            isinstance(k, str) and k.isidentifier() and isinstance(v, str) for k, v in environment.items()
        ):
            raise LocalBackupError("MLAPI_LOCAL_BACKUP_ENV must map environment variable names to strings")
        return cls(directory, os.environ.get("MLAPI_LOCAL_BACKUP_REPOSITORY") or None, environment)

    @property
    def settings(self) -> BackupSettings:
        return BackupSettings(
            self.repository or LOCAL_REPOSITORY, "@daily", self.keep_daily, self.keep_weekly, self.keep_monthly
        )

    @property
    def where(self) -> str:
        return self.repository or str(self.directory / "repo")


def password(options: LocalBackupOptions) -> str:
    path = options.directory / "password"
    if not path.exists():
        options.directory.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32))
    return path.read_text().strip()


def tool_image(client: docker.DockerClient) -> str:
    """Debian with restic and python3: the host tools the VM's scripts use (the base image has them)."""
    return images.build_base(client)


def run_script(
    client: docker.DockerClient,
    options: LocalBackupOptions,
    data_root: Path,
    state_dir: Path,
    script: str,
    args: list[str],
    environment: dict[str, str] | None = None,
    tmpfs: dict[str, str] | None = None,
) -> str:
    """Run one of the VM's scripts as root in the tool container; its output, or LocalBackupError with it.
    ``tmpfs``: small disks mounted over paths, to test what a full disk does."""
    env_file = options.directory / "env"
    env_file.parent.mkdir(parents=True, exist_ok=True)
    env_file.touch(mode=0o600)
    env_file.write_text(environment_lines(options.settings, password(options), options.environment))
    mounts = [
        Mount(target=str(data_root), source=str(data_root), type="bind"),
        Mount(target=ENV_FILE, source=str(env_file), type="bind", read_only=True),
        Mount(target=STATE_MOUNT, source=str(state_dir), type="bind"),
    ]
    if options.repository is None:
        (options.directory / "repo").mkdir(parents=True, exist_ok=True)
        mounts.append(Mount(target=LOCAL_REPOSITORY, source=str(options.directory / "repo"), type="bind"))
    container = client.containers.run(
        tool_image(client),
        ["sh", "-c", script, "mlapi-local", *args],
        detach=True,
        mounts=mounts,
        network_mode="host",
        environment=environment or {},
        tmpfs=tmpfs or {},
    )
    try:
        code = container.wait()["StatusCode"]
        output = container.logs().decode(errors="replace")
    finally:
        container.remove(force=True)
    if code != 0:
        raise LocalBackupError(output.strip())
    return output


def backup(client: docker.DockerClient, options: LocalBackupOptions, data_root: Path, state_dir: Path) -> str:
    script = backup_script(str(data_root), options.settings, HINTS, extra_stage_file=f"{STATE_MOUNT}/{CA_ROOT}")
    return run_script(client, options, data_root, state_dir, script, [])


def _wait_for_no_tasks(client: docker.DockerClient, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.api.tasks(filters={"service": MODEL_SERVICE, "desired-state": "running"}):
        if time.monotonic() > deadline:
            raise LocalBackupError(f"{MODEL_SERVICE} still has running tasks after {timeout:.0f} s")
        time.sleep(0.5)


def traefik_running(client: docker.DockerClient) -> bool:
    try:
        return client.containers.get(TRAEFIK_CONTAINER).status == "running"
    except docker.errors.NotFound:
        return False


def _start_traefik(client: docker.DockerClient, attempts: int = 30) -> None:
    """As the VM's boot guard does: the overlay may still be re-attaching right after the stop."""
    container = client.containers.get(TRAEFIK_CONTAINER)
    for _ in range(attempts):
        with contextlib.suppress(docker.errors.APIError):
            container.start()
            return
        time.sleep(1)
    container.start()


def restore(
    client: docker.DockerClient,
    options: LocalBackupOptions,
    data_root: Path,
    state_dir: Path,
    snapshot: str = "latest",
) -> str:
    """Stop the model service and Traefik (if they run), restore, start them again, even when the restore failed:
    a failure before the swap leaves the data as it was."""
    if not re.fullmatch(r"latest|[0-9a-f]{8,64}", snapshot):
        raise LocalBackupError(f"SNAPSHOT={snapshot!r}: give `latest` or a snapshot id (8 to 64 hex digits)")
    service = None
    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
        service = client.services.get(MODEL_SERVICE)
    replicas = service.attrs["Spec"]["Mode"]["Replicated"]["Replicas"] if service else 0
    running = traefik_running(client)
    if running:
        client.containers.get(TRAEFIK_CONTAINER).stop(timeout=10)
    if replicas:
        service.scale(0)
        _wait_for_no_tasks(client)
    try:
        return run_script(
            client,
            options,
            data_root,
            state_dir,
            restore_script(str(data_root), HINTS),
            [snapshot],
            {"RESTORE_EXTRA_TARGET": STATE_MOUNT},
        )
    finally:
        if running:
            _start_traefik(client)
        if replicas:
            client.services.get(MODEL_SERVICE).scale(replicas)


def last_backup(data_root: Path) -> str:
    """One line for `make local-status`, from the status file the backup script keeps for the service's gauges."""
    try:
        state = json.loads((data_root / "model" / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return "never"
    success = state.get("last_success_unixtime")
    failure = state.get("last_failure_unixtime", 0)
    parts = []
    if success:
        parts.append(
            f"last success {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(success))}, "
            f"{state.get('snapshots', 0)} snapshot(s)"
        )
    if failure and failure > (success or 0):
        parts.append(f"LAST RUN FAILED at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(failure))}")
    return "; ".join(parts) or "never"


def restore_and_check(
    client: docker.DockerClient,
    options: LocalBackupOptions,
    data_root: Path,
    state_dir: Path,
    snapshot: str,
    ready_url: str,
) -> list[str]:
    """`make local-restore`: restore, then (if the stack was running) wait until it serves the restored data."""
    data_root.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    running = traefik_running(client)
    lines = [restore(client, options, data_root, state_dir, snapshot).strip()]
    root = state_dir / CA_ROOT
    if running:
        ok, message = wait_healthy(ready_url, attempts=240, delay=0.25, cacert=str(root), connect_to="127.0.0.1")
        if not ok:
            raise LocalBackupError(f"restored, but the stack does not answer: {message}")
        lines.append(f"the stack serves the restored data at {ready_url.removesuffix('/ready')}")
    lines.append(
        f"the restored certificate chains to the CA root saved in {root} (Pebble's root at backup time); "
        "`make local-up` gets a new one from the running Pebble"
    )
    return lines
