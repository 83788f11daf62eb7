#!/usr/bin/env bash
# Builds crane (go-containerregistry's registry client, which also serves a registry:
# `crane registry serve`) from its Go module into $SLUICE_CACHE/crane/<version>/bin.
# Idempotent: an existing binary is kept. Prints the binary's path.
source "$(dirname "$0")/lib.sh"
CRANE_VERSION=${CRANE_VERSION:-v0.22.1}
bin=$SLUICE_CACHE/crane/$CRANE_VERSION/bin
go_install_tool "$bin" "github.com/google/go-containerregistry/cmd/crane@$CRANE_VERSION"
echo "$bin/crane"
