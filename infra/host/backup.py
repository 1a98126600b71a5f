"""Backups of the data volume with restic: the host scripts, their schedule, and the credentials bundle.

Pure renderers (tests run them for real in the VM stand-in). The credentials never appear in a command line, a
container label or user-data: the deploy step pipes them on stdin into root-only files under /etc/mlapi/backup.
"""

from __future__ import annotations

import base64
import shlex
from dataclasses import dataclass

from infra.host.setup import START_EDGE, HostFile
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
COUNT_SNAPSHOTS = (
    f"restic snapshots --tag {TAG} --json | python3 -c 'import json, sys; print(len(json.load(sys.stdin)))'"
)


@dataclass(frozen=True)
class Hints:
    """Where the operator fixes what a failure names (the VM: Pulumi config; the local stack: files in .local)."""

    key_fix: str = "pulumi config set --secret backupPassword"
    repository_fix: str = "pulumi config: backupRepository, backupEnvironment, backupSshKey"


# restic 0.14 (Debian 12) exits 1 for every error: these are its messages for "no repository there yet", per backend
# (local and sftp: no such file / does not exist; s3: the key or bucket does not exist; rest: 404).
ABSENT_PATTERNS = ('*"no such file or directory"*', '*"does not exist"*', '*" 404 "*', '*"404 Not Found"*')


def _prelude(name: str, data_root: str, hints: Hints) -> str:
    """The start both scripts share: credentials, the data root, and how they open the repository."""
    absent = "|".join(ABSENT_PATTERNS)
    return f"""set -eu
set -a; . {ENV_FILE}; set +a
DATA={shlex.quote(data_root)}
say() {{ echo "$(date -Is) {name}: $*"; }}
fail() {{ echo "$(date -Is) {name}: $*" >&2; exit 1; }}
# open_repository init|existing: 0 = open; 1 = there is none yet (created with `init`); fails on anything else.
open_repository() {{
  if error=$(restic cat config 2>&1 >/dev/null); then return 0; fi
  case $error in
    *"wrong password"*)
      fail "the restic repository exists but its password does not open it (fix: {hints.key_fix})" ;;
    {absent})
      if [ "${{1:-}}" = init ]; then
        restic init >/dev/null || fail "cannot create the restic repository (check {hints.repository_fix})"
        say "created the restic repository"
      fi
      return 1 ;;
  esac
  fail "cannot reach the restic repository: $(printf %s "$error" | grep -m1 . ) (check {hints.repository_fix}, and \
that this host reaches the target)"
}}
# need_space DIR KB WHAT: refuse early, with numbers, instead of failing half-way on a full disk.
need_space() {{
  free=$(df -Pk "$1" | awk 'NR == 2 {{ print $4 }}')
  if [ "$free" -lt "$2" ]; then
    fail "not enough space for $3: $(( $2 / 1024 + 1 )) MB needed in $1, $(( free / 1024 )) MB free; nothing changed"
  fi
}}
"""


def backup_script(data_root: str, settings: BackupSettings, hints: Hints = Hints(), extra_stage: str = "") -> str:
    """``extra_stage``: shell lines that add files under $STAGE (the local stack adds its CA root)."""
    keep = (
        f"--keep-daily {settings.keep_daily} --keep-weekly {settings.keep_weekly} "
        f"--keep-monthly {settings.keep_monthly}"
    )
    return f"""#!/bin/sh
# mlapi-backup [check]: a consistent snapshot of the data volume into the restic repository (infra/host/backup.py).
{_prelude("mlapi-backup", data_root, hints)}STATUS="$DATA/model/{STATUS_FILE}"
STAGE={STAGE}
exec 9>/run/mlapi-backup.lock
flock -n 9 || fail "another backup is running"
# $1 = success | failure; the service reads this file for its backup gauges. As the model's user, never root: the
# directory is the replicas', so a link planted there must reach nothing root could (e.g. this job's env file).
status() {{
  setpriv --reuid={MODEL_UID} --regid={MODEL_UID} --clear-groups python3 - "$STATUS" "$1" "${{2:-0}}" <<'PY'
import json, os, sys, tempfile, time
path, outcome, snapshots = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    with open(path, opener=lambda name, flags: os.open(name, flags | os.O_NOFOLLOW)) as handle:
        state = json.load(handle)
    if not isinstance(state, dict):
        state = {{}}
except (OSError, ValueError):
    state = {{}}
state[f"last_{{outcome}}_unixtime"] = time.time()
if outcome == "success":
    state["snapshots"] = snapshots
descriptor, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", dir=os.path.dirname(path))  # O_EXCL
with os.fdopen(descriptor, "w") as handle:
    json.dump(state, handle)
os.chmod(tmp, 0o644)
os.replace(tmp, path)
PY
}}
on_exit() {{
  rc=$?
  rm -rf "$STAGE"
  if [ "$rc" -ne 0 ]; then echo "$(date -Is) mlapi-backup: FAILED (exit $rc)" >&2; status failure || true; fi
}}
trap on_exit EXIT
open_repository init || true
if [ "${{1:-}}" = check ]; then
  restic check --read-data-subset=1/5
  say "check passed"
  exit 0
fi
rm -rf "$STAGE"; mkdir -p "$STAGE/model"
need_space "$STAGE" "$(( $(du -sk "$DATA/model" "$DATA/traefik" | awk '{{ s += $1 }} END {{ print s }}') * 11 / 10 ))" \
  "the staging copy"
# Every prediction log (the default one and one per model project, under projects/) is left to SQLite's backup.
tar -C "$DATA/model" --exclude='predictions.sqlite3*' --exclude='./{STATUS_FILE}*' -cf - . \
  | tar -C "$STAGE/model" -xpf -
chown {MODEL_UID}:{MODEL_UID} "$STAGE/model"  # tar -p also gives it the data directory's mode
# SQLite's online backup, as the service's user (so no file of the live database changes owner): consistent while
# the replicas keep writing; a copy of the live file would not be. Links are not followed.
setpriv --reuid={MODEL_UID} --regid={MODEL_UID} --clear-groups python3 -c '
import os, sqlite3, sys
source_root, stage_root = sys.argv[1], sys.argv[2]
for directory, _, files in os.walk(source_root):
    path = os.path.join(directory, "predictions.sqlite3")
    if "predictions.sqlite3" in files and not os.path.islink(path):
        source = sqlite3.connect(path, timeout=30)
        target = sqlite3.connect(os.path.join(stage_root, os.path.relpath(path, source_root)))
        source.backup(target)
        target.close(); source.close()' "$DATA/model" "$STAGE/model"
cp -a "$DATA/traefik" "$STAGE/traefik"  # with its owner and mode (0700: private keys)
{PG_DUMP}{extra_stage}restic backup --quiet --tag {TAG} --host {TAG} "$STAGE"
restic forget --quiet --tag {TAG} --host {TAG} {keep} --prune
count=$({COUNT_SNAPSHOTS})
status success "$count"
say "snapshot saved ($count in the repository)"
"""


# With workers, models and logs are in PostgreSQL (infra/spec/postgres.py): pg_dump is a consistent snapshot (one
# transaction) taken while the replicas keep writing; its live files on the volume are never copied.
PG_TASK = (
    f"pg=$(docker ps --quiet --filter label=com.docker.swarm.service.name={POSTGRES_SERVICE} --filter health=healthy"
    " | head -n 1)\n"
)
PG_DUMP = (
    PG_TASK
    + 'if [ -n "$pg" ]; then\n'
    # 0600: the dump holds every prediction, observation and model; only root reads it until restic encrypts it.
    + f'  (umask 077; docker exec "$pg" pg_dump -U {POSTGRES_USER} -d {POSTGRES_DB} --format=custom \\\n'
    + '    > "$STAGE/postgres.dump") \\\n'
    + '    || fail "pg_dump failed; no snapshot was made"\n'
    + "fi\n"
)
PENDING_DUMP = "postgres-restore.dump"  # in the data root: loaded by the deploy once PostgreSQL runs
# One transaction: the database is the snapshot's, whole, or unchanged. Before the files are swapped, so a failure
# leaves both as they were. No PostgreSQL yet (a new stack after a loss): the deploy loads it (LOAD_PENDING_DUMP).
PG_RESTORE = (
    'if [ -f "$restored/postgres.dump" ]; then\n'
    + "  "
    + PG_TASK
    + '  if [ -n "$pg" ]; then\n'
    + f'    if ! docker exec -i "$pg" pg_restore -U {POSTGRES_USER} -d {POSTGRES_DB} --clean --if-exists '
    + '--single-transaction --no-owner < "$restored/postgres.dump"; then\n'
    + f'      if [ "$replicas" != 0 ]; then docker service scale --detach=false {MODEL_SERVICE}="$replicas" '
    + ">/dev/null; fi\n"
    + f"      {START_EDGE}\n"
    + '      fail "pg_restore failed; the database and the files are unchanged"\n'
    + "    fi\n"
    + '    say "restored the database (models, prediction log, observations)"\n'
    + "  else\n"
    + f'    install -m 600 "$restored/postgres.dump" "$DATA/{PENDING_DUMP}"\n'
    + '    say "PostgreSQL is not running here: the next deploy loads the database snapshot"\n'
    + "  fi\n"
    + "fi\n"
)


def load_pending_dump(data_root: str) -> str:
    """The deploy step after PostgreSQL is up (with workers): a snapshot restored before it existed is loaded now,
    once (then renamed aside)."""
    pending = shlex.quote(f"{data_root.rstrip('/')}/{PENDING_DUMP}")
    return (
        "set -eu\n"
        + f"[ -f {pending} ] || {{ echo 'no database snapshot to load'; exit 0; }}\n"
        + "i=0; while :; do\n  "
        + PG_TASK
        + '  [ -n "$pg" ] && break\n'
        + '  i=$((i+1)); [ $i -lt 120 ] || { echo "PostgreSQL did not turn healthy" >&2; exit 1; }; sleep 1\n'
        + "done\n"
        + f'docker exec -i "$pg" pg_restore -U {POSTGRES_USER} -d {POSTGRES_DB} --clean --if-exists '
        + f"--single-transaction --no-owner < {pending}\n"
        + f'mv {pending} "{pending}.loaded-$(date +%Y%m%d%H%M%S)"\n'
        + "echo loaded the database snapshot\n"
    )


def restore_script(data_root: str, hints: Hints = Hints()) -> str:
    return f"""#!/bin/sh
# mlapi-restore [--if-empty] SNAPSHOT|latest: the data volume from a restic snapshot (infra/host/backup.py).
# The snapshot is fetched and copied onto the data volume first; only then are the model service and Traefik
# stopped, the current data renamed aside (*.before-restore-<time>) and the copy renamed in, and both started.
# A failure before the swap (repository, password, full disk) changes nothing.
# --if-empty: only when the volume holds no model yet and the repository has a snapshot (a new stack after a loss).
{_prelude("mlapi-restore", data_root, hints)}WORK={WORK_DIR}/restore
if [ "${{1:-}}" = --if-empty ]; then
  shift
  if [ -d "$DATA/model/models" ]; then say "nothing to do: the volume has data"; exit 0; fi
  if ! open_repository existing; then say "nothing to do: the repository has no snapshot yet"; exit 0; fi
  if [ "$({COUNT_SNAPSHOTS})" = 0 ]; then say "nothing to do: the repository has no snapshot yet"; exit 0; fi
else
  open_repository existing \
    || fail "there is no restic repository at the configured location (check {hints.repository_fix})"
fi
snapshot=${{1:?usage: mlapi-restore [--if-empty] SNAPSHOT|latest}}
stamp=$(date +%Y%m%d%H%M%S)
trap 'rm -rf "$WORK" "$DATA"/*.restoring-"$stamp"' EXIT
rm -rf "$WORK"; mkdir -p "$WORK"
restic restore "$snapshot" --tag {TAG} --host {TAG} --target "$WORK" >/dev/null \
  || fail "restic could not restore snapshot $snapshot (restic snapshots lists them); nothing changed"
restored="$WORK{STAGE}"
[ -d "$restored/model" ] || fail "snapshot $snapshot holds no model data; nothing changed"
need_space "$DATA" "$(du -sk "$restored" | awk '{{ print $1 }}')" "the restored data on the data volume"
for part in model traefik; do
  cp -a "$restored/$part" "$DATA/$part.restoring-$stamp" || fail "copying the snapshot failed; nothing changed"
done
replicas=0  # on a new host (disaster path) or the local stack's tool container there is no service to stop here
if docker service inspect {MODEL_SERVICE} >/dev/null 2>&1; then
  replicas=$(docker service inspect --format '{{{{.Spec.Mode.Replicated.Replicas}}}}' {MODEL_SERVICE})
fi
if [ "$replicas" != 0 ]; then docker service scale --detach=false {MODEL_SERVICE}=0 >/dev/null; fi
docker stop --time 10 {TRAEFIK_CONTAINER} >/dev/null 2>&1 || true
{PG_RESTORE}for part in model traefik; do
  if [ -e "$DATA/$part" ]; then mv "$DATA/$part" "$DATA/$part.before-restore-$stamp"; fi
  mv "$DATA/$part.restoring-$stamp" "$DATA/$part"
done
# A snapshot from before Traefik ran as its own user holds root's certificate store: Traefik could not read it.
chown -R {TRAEFIK_UID}:{TRAEFIK_UID} "$DATA/traefik"
# The backup status describes the repository, not the snapshot: keep the gauges' history.
# As the model's user, links not followed: both directories hold what the replicas wrote.
if [ -f "$DATA/model.before-restore-$stamp/{STATUS_FILE}" ]; then
  setpriv --reuid={MODEL_UID} --regid={MODEL_UID} --clear-groups cp -P -p --remove-destination \
    "$DATA/model.before-restore-$stamp/{STATUS_FILE}" "$DATA/model/" || say "the backup status was not carried over"
fi
# The local stack's extra files (the CA root its certificates chain to), for a caller that names a place for them.
if [ -d "$restored/local" ] && [ -n "${{RESTORE_EXTRA_TARGET:-}}" ]; then
  cp -a "$restored/local/." "$RESTORE_EXTRA_TARGET/"
fi
# A plain container on the overlay may fail to start while swarm re-attaches the network: the boot guard retries.
if docker inspect {TRAEFIK_CONTAINER} >/dev/null 2>&1; then {START_EDGE}; fi
if [ "$replicas" != 0 ]; then docker service scale --detach=false {MODEL_SERVICE}="$replicas" >/dev/null; fi
say "restored $snapshot (previous data kept as $DATA/*.before-restore-$stamp)"
"""


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
