"""Backups of the data volume with restic: the host scripts (files in infra/host/scripts/, with their settings), their
schedule, and the credentials bundle.

Pure renderers (tests run them for real in the VM stand-in). The credentials never appear in a command line, a
container label or user-data: the deploy step pipes them on stdin into root-only files under /etc/mlapi/backup.
"""

from __future__ import annotations

import base64
import shlex
from dataclasses import dataclass

from infra.host.setup import HEARTBEAT_COMMAND, SCRIPTS, START_EDGE, HostFile, installed_script
from infra.spec.backup import BackupSettings
from infra.spec.postgres import POSTGRES_DB, POSTGRES_SERVICE, POSTGRES_USER
from infra.spec.stack import MODEL_SERVICE, MODEL_UID, TRAEFIK_CONTAINER, TRAEFIK_UID

BACKUP_DIR = "/etc/mlapi/backup"
ENV_FILE = f"{BACKUP_DIR}/env"
SSH_KEY_FILE = f"{BACKUP_DIR}/ssh_key"
KNOWN_HOSTS_FILE = f"{BACKUP_DIR}/known_hosts"
SSH_CONFIG_FILE = "/etc/ssh/ssh_config.d/60-mlapi-backup.conf"
BACKUP_COMMAND = "/usr/local/sbin/mlapi-backup"
RESTORE_COMMAND = "/usr/local/sbin/mlapi-restore"
CRON_FILE = "/etc/cron.d/mlapi-backup"
LOGROTATE_FILE = "/etc/logrotate.d/mlapi-backup"
BACKUP_LOG = "/var/log/mlapi-backup.log"
WORK_DIR = "/var/lib/mlapi-backup"
STAGE = f"{WORK_DIR}/stage"  # the path every snapshot holds
STATUS_FILE = "backup-status.json"  # in the model's data dir: the service exports it as Prometheus gauges
TAG = "mlapi"
PENDING_DUMP = "postgres-restore.dump"  # in the data root: loaded by the deploy once PostgreSQL runs


@dataclass(frozen=True)
class Hints:
    """Where the operator fixes what a failure names (the VM: Pulumi config; the local stack: files in .local)."""

    key_fix: str = "pulumi config set --secret backupPassword"
    repository_fix: str = "pulumi config: backupRepository, backupEnvironment, backupSshKey"


def backup_command(name: str, script: str, data_root: str, hints: Hints, settings: dict[str, str]) -> str:
    """mlapi-backup or mlapi-restore as installed: the settings, backup-common.sh, then the script's own file."""
    shared = {  # what backup-common.sh and both scripts read; each script adds its own
        "NAME": name,
        "DATA": data_root,
        "ENV_FILE": ENV_FILE,
        "KEY_FIX": hints.key_fix,
        "REPOSITORY_FIX": hints.repository_fix,
        "TAG": TAG,
        "STAGE": STAGE,
        "STATUS_FILE": STATUS_FILE,
        "MODEL_UID": str(MODEL_UID),
        "POSTGRES_SERVICE": POSTGRES_SERVICE,
        "POSTGRES_USER": POSTGRES_USER,
        "POSTGRES_DB": POSTGRES_DB,
    }
    return installed_script(name, {**shared, **settings}, "backup-common.sh", script)


def backup_script(data_root: str, settings: BackupSettings, hints: Hints = Hints(), extra_stage_file: str = "") -> str:
    """``extra_stage_file``: a file the snapshot also takes, if it exists (the local stack's CA root)."""
    keep = f"--keep-daily {settings.keep_daily} --keep-weekly {settings.keep_weekly} "
    keep += f"--keep-monthly {settings.keep_monthly}"
    return backup_command(
        "mlapi-backup",
        "mlapi-backup.sh",
        data_root,
        hints,
        {
            "KEEP": keep,
            "EXTRA_STAGE_FILE": extra_stage_file,
            "HEARTBEAT_COMMAND": HEARTBEAT_COMMAND,
            # Python the job runs with the host's python3, kept as real files (ruff-checked, importable by tests).
            "BACKUP_STATUS_PY": (SCRIPTS / "backup_status.py").read_text(),
            "SQLITE_BACKUP_PY": (SCRIPTS / "sqlite_backup.py").read_text(),
        },
    )


def restore_script(data_root: str, hints: Hints = Hints()) -> str:
    settings = {
        "WORK_DIR": WORK_DIR,
        "TRAEFIK_UID": str(TRAEFIK_UID),
        "MODEL_SERVICE": MODEL_SERVICE,
        "TRAEFIK_CONTAINER": TRAEFIK_CONTAINER,
        "START_EDGE": START_EDGE,
        "PENDING_DUMP": PENDING_DUMP,
    }
    return backup_command("mlapi-restore", "mlapi-restore.sh", data_root, hints, settings)


def load_pending_dump(data_root: str) -> str:
    """The deploy step after PostgreSQL is up (with workers): a snapshot restored before it existed is loaded now,
    once (then renamed aside)."""
    settings = {
        "PENDING": f"{data_root.rstrip('/')}/{PENDING_DUMP}",
        "POSTGRES_SERVICE": POSTGRES_SERVICE,
        "POSTGRES_USER": POSTGRES_USER,
        "POSTGRES_DB": POSTGRES_DB,
    }
    return installed_script("load the database snapshot", settings, "load-pending-dump.sh")


def backup_files(settings: BackupSettings, data_root: str) -> tuple[HostFile, ...]:
    return (
        HostFile(BACKUP_COMMAND, backup_script(data_root, settings), "0755"),
        HostFile(RESTORE_COMMAND, restore_script(data_root), "0755"),
        HostFile(
            CRON_FILE,
            "# Backups of the data volume (restic) and a weekly check of the repository.\n"
            "SHELL=/bin/sh\nPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
            f"{settings.schedule} root {BACKUP_COMMAND} >> {BACKUP_LOG} 2>&1\n"
            f"@weekly root {BACKUP_COMMAND} check >> {BACKUP_LOG} 2>&1\n",
        ),
        HostFile(LOGROTATE_FILE, f"{BACKUP_LOG} {{\n  weekly\n  rotate 8\n  compress\n  missingok\n  notifempty\n}}\n"),
    )


def host_setup_parts(settings: BackupSettings | None, data_root: str) -> tuple[tuple[HostFile, ...], str]:
    """What backups add to the deploy step: their scripts and restic, or, turned off, the removal of both jobs and
    credentials."""
    if settings is None:
        return (), DISABLE_BACKUPS
    return backup_files(settings, data_root), INSTALL_RESTIC


INSTALL_RESTIC = (
    "command -v restic >/dev/null || { apt-get update -qq && "
    "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq restic >/dev/null; }\n"
)
# With backups turned off, no job may run with stale credentials.
DISABLE_BACKUPS = f"rm -f {CRON_FILE} {ENV_FILE} {SSH_KEY_FILE} {KNOWN_HOSTS_FILE} {SSH_CONFIG_FILE}\n"


def environment_lines(settings: BackupSettings, password: str, environment: dict[str, str]) -> str:
    """The env file both scripts source: restic's repository and password, then the repository's credentials."""
    lines = [f"RESTIC_REPOSITORY={shlex.quote(settings.repository)}", f"RESTIC_PASSWORD={shlex.quote(password)}"]
    lines += [f"{key}={shlex.quote(value)}" for key, value in sorted(environment.items())]
    return "\n".join(lines) + "\n"


def credentials_bundle(
    settings: BackupSettings,
    password: str,
    environment: dict[str, str],
    ssh_key: str | None,
    known_hosts: str | None,
) -> str:
    """What the installer reads on stdin: one `path mode base64` line per root-only file."""
    files = {ENV_FILE: environment_lines(settings, password, environment)}
    if settings.sftp_host and ssh_key:
        files[SSH_KEY_FILE] = ssh_key.strip() + "\n"
        checking = "yes" if known_hosts else "accept-new"
        files[SSH_CONFIG_FILE] = (
            f"# restic's sftp connection to the backup target (written by the deploy step)\n"
            f"Host {settings.sftp_host}\n  IdentityFile {SSH_KEY_FILE}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {KNOWN_HOSTS_FILE}\n  StrictHostKeyChecking {checking}\n"
            + (f"  Port {settings.sftp_port}\n" if settings.sftp_port else "")
        )
        files[KNOWN_HOSTS_FILE] = (known_hosts or "").strip() + "\n"
    return "".join(f"{path} 0600 {base64.b64encode(data.encode()).decode()}\n" for path, data in files.items())


# Reads the bundle from stdin (never argv, so never in `ps`), writes each file root-only, then restores the latest
# snapshot if the volume is empty (a new stack after a loss), before Traefik or the service start.
INSTALL_CREDENTIALS = (
    "set -eu\numask 077\n"
    f"mkdir -p {BACKUP_DIR}\n"
    "while read -r path mode blob; do\n"
    '  mkdir -p "$(dirname "$path")"\n'
    '  printf %s "$blob" | base64 -d > "$path.new" && chmod "$mode" "$path.new" && mv "$path.new" "$path"\n'
    "done\n"
    f"{RESTORE_COMMAND} --if-empty latest\n"
)
