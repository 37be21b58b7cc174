#!/bin/sh
# Joins the coordinator at $HERD_COORDINATOR_IP once its HTTP answers, reading its PeerId from
# /v1/status (compose cannot know it in advance: the coordinator makes its key at first start).
# Extra arguments go to `herd-node run`.
set -eu
: "${HERD_COORDINATOR_IP:?set HERD_COORDINATOR_IP}"
http="${HERD_COORDINATOR_HTTP:-http://$HERD_COORDINATOR_IP:8080}"
tries=0
until status=$(herd-coordinator status --url "$http" --json 2>/dev/null); do
    tries=$((tries + 1))
    if [ "$tries" -ge 120 ]; then
        echo "herd-node-join: no answer from $http after 120 s" >&2
        exit 1
    fi
    sleep 1
done
peer=$(printf '%s' "$status" | sed -n 's/.*"peer_id":"\([^"]*\)".*/\1/p')
exec herd-node run --coordinator "/ip4/$HERD_COORDINATOR_IP/tcp/4001/p2p/$peer" "$@"
