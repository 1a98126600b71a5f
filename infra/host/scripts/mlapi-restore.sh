#!/bin/sh
# mlapi-restore [--if-empty] SNAPSHOT|latest: the data volume from a restic snapshot. The settings and
# backup-common.sh come first in the installed script (infra/host/backup.py renders them).
# The snapshot is fetched and copied onto the data volume first; only then are the model service and Traefik
# stopped, the current data renamed aside (*.before-restore-<time>) and the copy renamed in, and both started.
# A failure before the swap (repository, password, full disk) changes nothing.
# --if-empty: only when the volume holds no model yet and the repository has a snapshot (a new stack after a loss).
WORK="$WORK_DIR/restore"
if [ "${1:-}" = --if-empty ]; then
  shift
  if [ -d "$DATA/model/models" ]; then say "nothing to do: the volume has data"; exit 0; fi
  if ! open_repository existing; then say "nothing to do: the repository has no snapshot yet"; exit 0; fi
  if [ "$(count_snapshots)" = 0 ]; then say "nothing to do: the repository has no snapshot yet"; exit 0; fi
else
  open_repository existing \
    || fail "there is no restic repository at the configured location (check $REPOSITORY_FIX)"
fi
snapshot=${1:?usage: mlapi-restore [--if-empty] SNAPSHOT|latest}
stamp=$(date +%Y%m%d%H%M%S)
trap 'rm -rf "$WORK" "$DATA"/*.restoring-"$stamp"' EXIT
rm -rf "$WORK"; mkdir -p "$WORK"
restic restore "$snapshot" --tag "$TAG" --host "$TAG" --target "$WORK" >/dev/null \
  || fail "restic could not restore snapshot $snapshot (restic snapshots lists them); nothing changed"
restored="$WORK$STAGE"
[ -d "$restored/model" ] || fail "snapshot $snapshot holds no model data; nothing changed"
need_space "$DATA" "$(du -sk "$restored" | awk '{ print $1 }')" "the restored data on the data volume"
for part in model traefik; do
  cp -a "$restored/$part" "$DATA/$part.restoring-$stamp" || fail "copying the snapshot failed; nothing changed"
done
replicas=0  # on a new host (disaster path) or the local stack's tool container there is no service to stop here
if docker service inspect "$MODEL_SERVICE" >/dev/null 2>&1; then
  replicas=$(docker service inspect --format '{{.Spec.Mode.Replicated.Replicas}}' "$MODEL_SERVICE")
fi
if [ "$replicas" != 0 ]; then docker service scale --detach=false "$MODEL_SERVICE=0" >/dev/null; fi
docker stop --time 10 "$TRAEFIK_CONTAINER" >/dev/null 2>&1 || true
# The database: one transaction, so it is the snapshot's, whole, or unchanged; before the files are swapped, so a
# failure leaves both as they were. No PostgreSQL yet (a new stack after a loss): the deploy loads it later.
if [ -f "$restored/postgres.dump" ]; then
  pg=$(postgres_task)
  if [ -n "$pg" ]; then
    if ! docker exec -i "$pg" pg_restore -U "$POSTGRES_USER" -d "$POSTGRES_DB" --clean --if-exists \
        --single-transaction --no-owner < "$restored/postgres.dump"; then
      if [ "$replicas" != 0 ]; then docker service scale --detach=false "$MODEL_SERVICE=$replicas" >/dev/null; fi
      "$START_EDGE"
      fail "pg_restore failed; the database and the files are unchanged"
    fi
    say "restored the database (models, prediction log, observations)"
  else
    install -m 600 "$restored/postgres.dump" "$DATA/$PENDING_DUMP"
    say "PostgreSQL is not running here: the next deploy loads the database snapshot"
  fi
fi
for part in model traefik; do
  if [ -e "$DATA/$part" ]; then mv "$DATA/$part" "$DATA/$part.before-restore-$stamp"; fi
  mv "$DATA/$part.restoring-$stamp" "$DATA/$part"
done
# A snapshot from before Traefik ran as its own user holds root's certificate store: Traefik could not read it.
chown -R "$TRAEFIK_UID:$TRAEFIK_UID" "$DATA/traefik"
# The backup status describes the repository, not the snapshot: keep the gauges' history.
# As the model's user, links not followed: both directories hold what the replicas wrote.
if [ -f "$DATA/model.before-restore-$stamp/$STATUS_FILE" ]; then
  setpriv --reuid="$MODEL_UID" --regid="$MODEL_UID" --clear-groups cp -P -p --remove-destination \
    "$DATA/model.before-restore-$stamp/$STATUS_FILE" "$DATA/model/" || say "the backup status was not carried over"
fi
# The local stack's extra files (the CA root its certificates chain to), for a caller that names a place for them.
if [ -d "$restored/local" ] && [ -n "${RESTORE_EXTRA_TARGET:-}" ]; then
  cp -a "$restored/local/." "$RESTORE_EXTRA_TARGET/"
fi
# A plain container on the overlay may fail to start while swarm re-attaches the network: the boot guard retries.
if docker inspect "$TRAEFIK_CONTAINER" >/dev/null 2>&1; then "$START_EDGE"; fi
if [ "$replicas" != 0 ]; then docker service scale --detach=false "$MODEL_SERVICE=$replicas" >/dev/null; fi
say "restored $snapshot (previous data kept as $DATA/*.before-restore-$stamp)"
