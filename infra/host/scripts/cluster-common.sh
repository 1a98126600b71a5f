#!/bin/sh
# What the cluster steps share (rendered before them by infra/host/cluster_plan.py).
# wait_for_address ADDRESS WHAT: a private-network address appears on an interface some seconds after the server is
# attached; fail with the likely cause if it never does.
wait_for_address() {
  i=0
  while ! ip -4 -o addr show | grep -q " inet $1/" && [ "$i" -lt 120 ]; do sleep 1; i=$((i+1)); done
  ip -4 -o addr show | grep -q " inet $1/" || {
    echo "$2: $1 is on no interface after 120 s (is the server attached to the private network?)" >&2; exit 1
  }
}
