#!/bin/sh
# Before the volume is detached (`pulumi destroy`, or a server replacement): stop the model's tasks with their grace
# period (the prediction log is closed and checkpointed), stop Traefik, flush and unmount the volume. Settings first
# (infra/host/setup.py): MODEL_SERVICE, TRAEFIK_CONTAINER, DATA_ROOT.
docker service rm "$MODEL_SERVICE" >/dev/null 2>&1 || true
i=0
while [ -n "$(docker ps --quiet --filter "label=com.docker.swarm.service.name=$MODEL_SERVICE")" ] && [ "$i" -lt 60 ]; do
  sleep 1; i=$((i+1))
done
docker stop --time 10 "$TRAEFIK_CONTAINER" >/dev/null 2>&1 || true
sync
if mountpoint -q "$DATA_ROOT"; then umount "$DATA_ROOT"; fi
echo stopped and unmounted
