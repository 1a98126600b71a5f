#!/bin/sh
# The deploy step after PostgreSQL is up (with workers): a database snapshot restored before PostgreSQL existed is
# loaded now, once, then renamed aside. Settings first (infra/host/backup.py): PENDING, POSTGRES_SERVICE,
# POSTGRES_USER, POSTGRES_DB.
set -eu
[ -f "$PENDING" ] || { echo 'no database snapshot to load'; exit 0; }
i=0
while :; do
  pg=$(docker ps --quiet --filter "label=com.docker.swarm.service.name=$POSTGRES_SERVICE" --filter health=healthy \
    | head -n 1)
  [ -n "$pg" ] && break
  i=$((i+1)); [ "$i" -lt 120 ] || { echo "PostgreSQL did not turn healthy" >&2; exit 1; }; sleep 1
done
docker exec -i "$pg" pg_restore -U "$POSTGRES_USER" -d "$POSTGRES_DB" --clean --if-exists --single-transaction \
  --no-owner < "$PENDING"
mv "$PENDING" "$PENDING.loaded-$(date +%Y%m%d%H%M%S)"
echo loaded the database snapshot
