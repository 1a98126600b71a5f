#!/bin/sh
# What `mlapi status` reads on the stack's host (the manager, or this machine for the local stack), printed as
# sections that infra/ops/status.py parses. Run by root as `sh -s -- DATA_ROOT SERVICE PORT` (the script on stdin).
# It only reads: a failing part prints its error inside its section and the others still run.
set -u
data_root=$1
service=$2
port=$3

section() { printf '\n### %s\n' "$1"; }

section tasks
docker service ps "$service" --filter desired-state=running --no-trunc --format '{{json .}}' 2>&1

section desired
docker service inspect "$service" --format '{{json .Spec.Mode}}' 2>&1

section replicas
# Each replica on this host answers for itself (which version, its holdout metrics), a line per task: "TASK_ID JSON".
docker ps --filter "label=com.docker.swarm.service.name=$service" --filter status=running \
  --format '{{.ID}} {{.Label "com.docker.swarm.task.id"}}' |
  while read -r container task; do
    printf '%s ' "$task"
    docker exec "$container" python -c "import sys, urllib.request as u; sys.stdout.write(u.urlopen('http://127.0.0.1:$port/model', timeout=10).read().decode())" 2>/dev/null \
      || printf '{"error": "replica %s does not answer /model"}' "$container"
    echo
  done

first=$(docker ps -q --filter "label=com.docker.swarm.service.name=$service" --filter status=running | head -n 1)
section versions
[ -n "$first" ] && docker exec "$first" python -m app versions 2>&1

section drift
[ -n "$first" ] && docker exec "$first" python -m app drift 2>&1

section backup
cat "$data_root/model/backup-status.json" 2>/dev/null

section disk
df -P -B1 "$data_root" 2>&1 | tail -n 1
