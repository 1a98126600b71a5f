#!/bin/sh
# A one-shot swarm job run to completion by the deploy (the first version of a project whose data needs
# credentials: the job mounts the swarm secret the replicas mount). A previous run's service is replaced; the job's
# output is printed; a failed task, or one not done within TIMEOUT_S, fails the deploy with swarm's error.
# Settings first (infra/host/jobs.py): JOB (the service's name), TIMEOUT_S, JOB_ARGS (docker service create's
# arguments, one per line: the values have no newline).
set -eu
docker service rm "$JOB" >/dev/null 2>&1 || true
old_ifs=$IFS
IFS='
'
set -f
# shellcheck disable=SC2086 # split on newlines on purpose: one argument per line
set -- $JOB_ARGS
set +f
IFS=$old_ifs
docker service create --quiet --detach --name "$JOB" --mode replicated-job "$@" >/dev/null
waited=0
state=new
while [ "$waited" -lt "$TIMEOUT_S" ]; do
  state=$(docker service ps --no-trunc --format '{{.CurrentState}}' "$JOB" | head -n 1)
  case "$state" in
    Complete*|Failed*|Rejected*|Orphaned*) break ;;
  esac
  sleep 2
  waited=$((waited + 2))
done
docker service logs --raw "$JOB" 2>&1 | tail -n 50
case "$state" in
  Complete*)
    docker service rm "$JOB" >/dev/null
    echo "$JOB: complete"
    ;;
  *)
    why=$(docker service ps --no-trunc --format '{{.Error}}' "$JOB" | head -n 1)
    docker service rm "$JOB" >/dev/null
    echo "$JOB did not complete (${state:-no task}; ${why:-no error recorded}); its output is above" >&2
    exit 1
    ;;
esac
