#!/bin/sh
# mlapi-start-edge: run at boot by cron (@reboot), and by a restore; safe to run any time. The settings come first in
# the installed script (infra/host/setup.py: TRAEFIK_CONTAINER, NETWORK, EDGE_WAIT_S).
i=0
until [ "$(docker inspect --format '{{.State.Running}}' "$TRAEFIK_CONTAINER" 2>/dev/null)" = true ]; do
  if [ "$i" -ge "$EDGE_WAIT_S" ]; then
    echo "$(date -Is) $TRAEFIK_CONTAINER not running after $EDGE_WAIT_S s" >&2; exit 1
  fi
  if [ "$(docker info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null)" = active ] \
     && docker network inspect "$NETWORK" >/dev/null 2>&1; then
    docker start "$TRAEFIK_CONTAINER" >/dev/null 2>&1 || true
  fi
  sleep 2; i=$((i+2))
done
echo "$(date -Is) $TRAEFIK_CONTAINER running"
