#!/bin/sh
# What `mlapi status` reads on the stack's host (the manager, or this machine for the local stack), printed as
# sections that infra/ops/status.py parses. Run by root as `sh -s -- DATA_ROOT SERVICE PORT PROMETHEUS` (the script
# on stdin; PROMETHEUS: host:port on the overlay).
# It only reads: a failing part prints its error inside its section and the others still run.
set -u
data_root=$1
service=$2
port=$3
prometheus=$4

section() { printf '\n### %s\n' "$1"; }

section tasks
docker service ps "$service" --filter desired-state=running --no-trunc --format '{{json .}}' 2>&1

section addresses
# Each task's address on the overlay ("TASK_ID ADDRESS/PREFIX ..."), to match Prometheus' targets (any node's task).
docker service ps "$service" --filter desired-state=running -q --no-trunc |
  xargs -r docker inspect --format '{{.ID}} {{range .NetworksAttachments}}{{range .Addresses}}{{.}} {{end}}{{end}}' 2>&1

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

section monitoring
# Prometheus, asked from a replica (it is on the overlay; Prometheus' port is published nowhere): the alerts firing,
# and the edge's HTTPS requests and 5xx answers over the last hour.
query='
import json, sys, urllib.parse, urllib.request
base = "http://" + sys.argv[1]
def data(path):
    return json.load(urllib.request.urlopen(base + path, timeout=10))["data"]
def total(expr):
    found = data("/api/v1/query?" + urllib.parse.urlencode({"query": "sum(increase(" + expr + "[1h]))"}))["result"]
    return round(float(found[0]["value"][1])) if found else 0
versions = {
    series["metric"]["instance"]: series["metric"].get("version")
    for series in data("/api/v1/query?" + urllib.parse.urlencode({"query": "mlapi_model_info"}))["result"]
}
alerts = [
    {"name": a["labels"]["alertname"], "severity": a["labels"].get("severity", ""),
     "summary": a["annotations"].get("summary", ""), "since": a.get("activeAt", "")}
    for a in data("/api/v1/alerts")["alerts"] if a["state"] == "firing"
]
edge = "traefik_entrypoint_requests_total{entrypoint=\"websecure\""
print(json.dumps({"alerts": alerts, "versions": versions, "edge": {"requests_1h": total(edge + "}"), "errors_5xx_1h": total(edge + ",code=~\"5..\"}")}}))
'
[ -n "$first" ] && docker exec "$first" python -c "$query" "$prometheus" 2>&1 | tail -n 1
