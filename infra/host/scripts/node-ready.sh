#!/bin/sh
# On the manager: wait until the joined node is Ready, then label it so the replicas spread onto it. Settings first
# (infra/host/cluster_plan.py): NODE (a swarm node ID, checked before rendering), LABEL, NODE_LABEL, TIMEOUT_S.
set -eu
i=0
while [ "$(docker node inspect --format '{{.Status.State}}' "$NODE" 2>/dev/null)" != ready ] \
      && [ "$i" -lt "$TIMEOUT_S" ]; do
  sleep 1; i=$((i+1))
done
[ "$(docker node inspect --format '{{.Status.State}}' "$NODE")" = ready ] \
  || { echo "node $NODE did not become ready in $TIMEOUT_S s" >&2; exit 1; }
docker node update --availability active --label-add "$NODE_LABEL=$LABEL" "$NODE" >/dev/null
echo "node $NODE ready as $LABEL"
