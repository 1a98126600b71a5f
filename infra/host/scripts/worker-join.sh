#!/bin/sh
# On a worker: join the manager's swarm over the private network with the token read from stdin (never on a command
# line or in a resource's inputs in plaintext); print the node ID, which the manager's steps use. A second `up` with
# the same token finds the node joined and does nothing; another token (a new or rotated swarm): leave, join again.
# Settings first (infra/host/cluster_plan.py): WORKER_IP, MANAGER_IP, SWARM_PORT, JOINED_TOKEN_FILE.
set -eu
wait_for_address "$WORKER_IP" "worker address"
token=$(cat)
# A swarm token is SWMTKN-1- and [a-z0-9-]: anything else is refused before it reaches JSON or a shell.
case $token in SWMTKN-1-*) ;; *) echo "stdin holds no swarm join token" >&2; exit 1 ;; esac
case $token in *[!A-Za-z0-9-]*) echo "the swarm join token has unexpected characters" >&2; exit 1 ;; esac
digest=$(printf %s "$token" | sha256sum | cut -d" " -f1)
if [ "$(docker info --format "{{.Swarm.LocalNodeState}}")" = active ] \
   && [ "$(cat "$JOINED_TOKEN_FILE" 2>/dev/null)" != "$digest" ]; then
  docker swarm leave --force >/dev/null
fi
if [ "$(docker info --format "{{.Swarm.LocalNodeState}}")" != active ]; then
  # The engine's API with the request on stdin: `docker swarm join` with the token as an argument would show it to
  # anyone who lists processes while it runs (printf is the shell's own, no process).
  printf '{"ListenAddr":"%s:%s","AdvertiseAddr":"%s","DataPathAddr":"%s","RemoteAddrs":["%s:%s"],"JoinToken":"%s"}' \
    "$WORKER_IP" "$SWARM_PORT" "$WORKER_IP" "$WORKER_IP" "$MANAGER_IP" "$SWARM_PORT" "$token" \
    | curl --silent --show-error --fail-with-body --unix-socket /var/run/docker.sock \
      -H 'Content-Type: application/json' --data-binary @- http://localhost/swarm/join >&2
  mkdir -p "$(dirname "$JOINED_TOKEN_FILE")" && echo "$digest" > "$JOINED_TOKEN_FILE"
fi
docker info --format "{{.Swarm.NodeID}}"
