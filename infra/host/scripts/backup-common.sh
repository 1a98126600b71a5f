#!/bin/sh
# What mlapi-backup and mlapi-restore share: credentials, logging, opening the repository, the space check.
# Rendered into both scripts after their settings (infra/host/backup.py: NAME, DATA, KEY_FIX, REPOSITORY_FIX).
set -eu
set -a
# shellcheck disable=SC1090  # the credentials file the deploy step wrote, root-only
. "$ENV_FILE"
set +a
say() { echo "$(date -Is) $NAME: $*"; }
fail() { echo "$(date -Is) $NAME: $*" >&2; exit 1; }
# open_repository init|existing: 0 = open; 1 = there is none yet (created with `init`); fails on anything else.
# restic 0.14 (Debian 12) exits 1 for every error: these are its messages for "no repository there yet", per backend
# (local and sftp: no such file / does not exist; s3: the key or bucket does not exist; rest: 404).
open_repository() {
  if error=$(restic cat config 2>&1 >/dev/null); then return 0; fi
  case $error in
    *"wrong password"*)
      fail "the restic repository exists but its password does not open it (fix: $KEY_FIX)" ;;
    *"no such file or directory"* | *"does not exist"* | *" 404 "* | *"404 Not Found"*)
      if [ "${1:-}" = init ]; then
        restic init >/dev/null || fail "cannot create the restic repository (check $REPOSITORY_FIX)"
        say "created the restic repository"
      fi
      return 1 ;;
  esac
  fail "cannot reach the restic repository: $(printf %s "$error" | grep -m1 .) (check $REPOSITORY_FIX, and \
that this host reaches the target)"
}
# need_space DIR KB WHAT: refuse early, with numbers, instead of failing half-way on a full disk.
need_space() {
  free=$(df -Pk "$1" | awk 'NR == 2 { print $4 }')
  if [ "$free" -lt "$2" ]; then
    fail "not enough space for $3: $(( $2 / 1024 + 1 )) MB needed in $1, $(( free / 1024 )) MB free; nothing changed"
  fi
}
count_snapshots() {
  restic snapshots --tag "$TAG" --json | python3 -c 'import json, sys; print(len(json.load(sys.stdin)))'
}
# The PostgreSQL task on this node, healthy (with workers, models and logs live there); empty without one.
postgres_task() {
  docker ps --quiet --filter "label=com.docker.swarm.service.name=$POSTGRES_SERVICE" --filter health=healthy \
    | head -n 1
}
# dump_postgres: with workers, models and logs are in PostgreSQL; pg_dump is a consistent snapshot (one transaction)
# taken while the replicas keep writing, and its live files on the volume are never copied. 0600: the dump holds
# every prediction, observation and model; only root reads it until restic encrypts it.
dump_postgres() {
  pg=$(postgres_task)
  if [ -n "$pg" ]; then
    (umask 077; docker exec "$pg" pg_dump -U "$POSTGRES_USER" -d "$POSTGRES_DB" --format=custom \
      > "$STAGE/postgres.dump") \
      || fail "pg_dump failed; no snapshot was made"
  fi
}
