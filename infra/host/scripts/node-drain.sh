#!/bin/sh
# On the manager, before a worker goes: drain it, so swarm starts its replicas elsewhere first (start-first) and stops
# these with their grace period, wait until none is left, then remove the node. A node already gone is fine.
# Settings first (infra/host/cluster_plan.py): NODE (a swarm node ID, checked before rendering), TIMEOUT_S,
# MODEL_SERVICE.
set -u
docker node inspect "$NODE" >/dev/null 2>&1 || { echo "node $NODE is already gone"; exit 0; }
docker node update --availability drain "$NODE" >/dev/null
# Until no task of the node still runs: a stopping replica finishes its requests (its grace period).
i=0
while docker node ps --format '{{.CurrentState}}' "$NODE" | grep -qE '^(Running|Starting|Preparing)' \
      && [ "$i" -lt "$TIMEOUT_S" ]; do
  sleep 1; i=$((i+1))
done
# The node's tasks are gone; wait for the service to be whole again elsewhere before the node goes.
i=0
while docker service ls --filter "name=$MODEL_SERVICE" --format '{{.Replicas}}' \
      | awk -F/ '$1+0 != $2+0 {f=1} END {exit !f}' && [ "$i" -lt 120 ]; do
  sleep 1; i=$((i+1))
done
docker node rm --force "$NODE" >/dev/null
echo "node $NODE drained and removed"
