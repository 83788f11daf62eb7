#!/usr/bin/env bash
# Builds crane (go-containerregistry's registry client, which also serves a registry:
# `crane registry serve`) from its Go module into $SLUICE_CACHE/crane/<version>/bin.
# Idempotent: an existing binary is kept. Prints the binary's path.
source "$(dirname "$0")/lib.sh"
CRANE_VERSION=${CRANE_VERSION:-v0.22.1}
bin=$SLUICE_CACHE/crane/$CRANE_VERSION/bin
if [[ ! -x $bin/crane ]]; then
  log "building crane $CRANE_VERSION from github.com/google/go-containerregistry"
  mkdir -p "$bin"
  tmp=$(mktemp -d)
  CGO_ENABLED=0 GOBIN=$tmp go install -trimpath -ldflags "-s -w" \
    "github.com/google/go-containerregistry/cmd/crane@$CRANE_VERSION"
  mv "$tmp/crane" "$bin/crane"
  rmdir "$tmp"
fi
echo "$bin/crane"
