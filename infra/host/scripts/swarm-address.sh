#!/bin/sh
# On the manager: move its swarm to ADVERTISE if it is elsewhere. `--force-new-cluster` rebuilds the one-manager
# cluster from its own raft state, so services, secrets, networks and node labels are kept; the running tasks are
# not restarted. Idempotent. Settings first (infra/host/cluster_plan.py): ADVERTISE, LISTEN, DATA_PATH (may be
# empty), WAIT (the address to wait for, or empty), NODE_LABEL, MANAGER_NODE, SEED_MARKER (or empty), MODEL_UID.
set -eu
if [ -n "$WAIT" ]; then wait_for_address "$WAIT" "swarm address"; fi
set -- --advertise-addr "$ADVERTISE" --listen-addr "$LISTEN"
if [ -n "$DATA_PATH" ]; then set -- "$@" --data-path-addr "$DATA_PATH"; fi
if [ "$(docker info --format "{{.Swarm.LocalNodeState}}")" != active ]; then
  docker swarm init "$@" >/dev/null
fi
current=$(docker info --format "{{.Swarm.NodeAddr}}")
if [ "$current" != "$ADVERTISE" ]; then
  docker swarm init --force-new-cluster "$@" >/dev/null
  echo "swarm moved from $current to $ADVERTISE"
fi
docker node update --label-add "$NODE_LABEL=$MANAGER_NODE" "$(docker info --format '{{.Swarm.NodeID}}')" >/dev/null
# The seed marker: the replicas of this node that see it seed the shared registry with this node's models. The
# model's directory is the replicas': root never writes there, and a link there is refused.
if [ -n "$SEED_MARKER" ]; then
  if [ -L "$SEED_MARKER" ]; then
    echo "$SEED_MARKER is a symbolic link; refusing to follow it (remove it, then deploy again)" >&2; exit 1
  fi
  setpriv --reuid="$MODEL_UID" --regid="$MODEL_UID" --clear-groups touch "$SEED_MARKER"
fi
echo "swarm on $ADVERTISE"
