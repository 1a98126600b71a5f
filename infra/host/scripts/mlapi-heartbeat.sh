#!/bin/sh
# mlapi-heartbeat edge|backup|retrain: one GET to the operator's heartbeat URL (healthchecks.io, an Uptime Kuma push
# monitor, any checker that expects a ping every few minutes), so that a checker outside the VM notices when pings
# stop. `edge` (cron, every few minutes) pings only when the public entry point answers /health; `backup` and
# `retrain` are called after a run that succeeded. Without a URL file (heartbeatUrl unset) it does nothing. The
# settings come first in the installed script (infra/host/setup.py: DOMAIN, HTTPS_PORT, URL_FILE).
set -eu
source_name=${1:?usage: mlapi-heartbeat edge|backup|retrain}
[ -s "$URL_FILE" ] || exit 0
if [ "$source_name" = edge ]; then
  # Through Traefik's own port and TLS, the way clients come in. The certificate is not verified here: its expiry
  # has an alert of its own; this says whether the VM, the edge and a replica answer.
  if ! curl -fsS -o /dev/null --max-time 10 --insecure --resolve "$DOMAIN:$HTTPS_PORT:127.0.0.1" \
      "https://$DOMAIN:$HTTPS_PORT/health"; then
    echo "$(date -Is) mlapi-heartbeat: https://$DOMAIN/health did not answer 200 on this host; no ping sent" >&2
    exit 1
  fi
fi
# The URL holds the checker's token: it goes to curl on stdin, never on a command line (`ps` shows those).
url=$(head -n 1 "$URL_FILE")
if printf 'url = "%s"\n' "$url" | curl -fsS -o /dev/null --max-time 10 --retry 2 \
    --user-agent "mlapi-heartbeat/$source_name" --config -; then
  echo "$(date -Is) mlapi-heartbeat: ping sent ($source_name)"
else
  echo "$(date -Is) mlapi-heartbeat: the heartbeat URL did not take the ping ($source_name)" >&2
  exit 1
fi
