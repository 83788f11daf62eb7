#!/usr/bin/env bash
# An OCI registry for the test bed: `crane registry serve` (go-containerregistry, built from
# its Go module by build-crane.sh) on 127.0.0.1:$REGISTRY_PORT, blobs on disk under
# $SLUICE_STATE/registry. The node's containerd pulls from it without any configuration:
# its CRI plugin speaks plain HTTP to registries on localhost/127.0.0.1 (and only there).
#
#   registry.sh up | down | info
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
REGISTRY_PORT=${REGISTRY_PORT:-5005}
REGISTRY_ADDR=127.0.0.1:$REGISTRY_PORT
case ${1:-up} in
  up)
    crane=$(bash "$here/build-crane.sh")
    mkdir -p "$SLUICE_STATE/registry"
    start_daemon registry "$crane" registry serve --address "$REGISTRY_ADDR" \
      --disk "$SLUICE_STATE/registry"
    wait_for registry "$SLUICE_LOGS/registry.log" 30 port_open 127.0.0.1 "$REGISTRY_PORT"
    log "registry on $REGISTRY_ADDR"
    ;;
  down) stop_daemon registry; rm -rf "$SLUICE_STATE/registry" ;;
  info) echo "$REGISTRY_ADDR" ;;
  *) die "usage: registry.sh up|down|info" ;;
esac
