#!/bin/sh
# mlapi-backup [check]: a consistent snapshot of the data volume into the restic repository. The settings and
# backup-common.sh come first in the installed script (infra/host/backup.py renders them).
STATUS="$DATA/model/$STATUS_FILE"
exec 9>/run/mlapi-backup.lock
flock -n 9 || fail "another backup is running"
# $1 = success | failure; the service reads this file for its backup gauges. As the model's user, never root: the
# directory is the replicas', so a link planted there must reach nothing root could (e.g. this job's env file).
status() {
  setpriv --reuid="$MODEL_UID" --regid="$MODEL_UID" --clear-groups \
    python3 -c "$BACKUP_STATUS_PY" "$STATUS" "$1" "${2:-0}"
}
on_exit() {
  rc=$?
  rm -rf "$STAGE"
  if [ "$rc" -ne 0 ]; then echo "$(date -Is) mlapi-backup: FAILED (exit $rc)" >&2; status failure || true; fi
}
trap on_exit EXIT
open_repository init || true
if [ "${1:-}" = check ]; then
  restic check --read-data-subset=1/5
  say "check passed"
  exit 0
fi
rm -rf "$STAGE"; mkdir -p "$STAGE/model"
need_space "$STAGE" "$(( $(du -sk "$DATA/model" "$DATA/traefik" | awk '{ s += $1 } END { print s }') * 11 / 10 ))" \
  "the staging copy"
# Every prediction log (the default one and one per model project, under projects/) is left to SQLite's backup.
tar -C "$DATA/model" --exclude='predictions.sqlite3*' --exclude="./$STATUS_FILE*" -cf - . \
  | tar -C "$STAGE/model" -xpf -
chown "$MODEL_UID:$MODEL_UID" "$STAGE/model"  # tar -p also gives it the data directory's mode
# SQLite's online backup, as the service's user (so no file of the live database changes owner): consistent while
# the replicas keep writing; a copy of the live file would not be. Links are not followed.
setpriv --reuid="$MODEL_UID" --regid="$MODEL_UID" --clear-groups \
  python3 -c "$SQLITE_BACKUP_PY" "$DATA/model" "$STAGE/model"
cp -a "$DATA/traefik" "$STAGE/traefik"  # with its owner and mode (0700: private keys)
dump_postgres
# The local stack adds its CA root (the certificates chain to it).
if [ -n "${EXTRA_STAGE_FILE:-}" ] && [ -f "$EXTRA_STAGE_FILE" ]; then
  mkdir -p "$STAGE/local" && cp "$EXTRA_STAGE_FILE" "$STAGE/local/"
fi
restic backup --quiet --tag "$TAG" --host "$TAG" "$STAGE"
# shellcheck disable=SC2086  # KEEP is several options
restic forget --quiet --tag "$TAG" --host "$TAG" $KEEP --prune
count=$(count_snapshots)
status success "$count"
say "snapshot saved ($count in the repository)"
# The checker outside the VM hears of each good backup (heartbeatUrl; installed on the VM only). Its failure is
# logged by it and does not fail the backup.
if [ -x "$HEARTBEAT_COMMAND" ]; then "$HEARTBEAT_COMMAND" backup || true; fi
