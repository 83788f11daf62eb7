#!/usr/bin/env bash
# Builds kind (Kubernetes in Docker/Podman/nerdctl) from its Go module sigs.k8s.io/kind into
# $SLUICE_CACHE/kind/<version>/bin, for deploy/kind-e2e.sh and the test that loads that
# script's cluster config through kind (tests/tests/kind_e2e.rs). Idempotent: an existing
# binary is kept. Prints the binary's path.
source "$(dirname "$0")/lib.sh"
# v0.30.0: its default node image is Kubernetes 1.34, the test bed's version.
KIND_VERSION=${KIND_VERSION:-v0.30.0}
bin=$SLUICE_CACHE/kind/$KIND_VERSION/bin
if [[ ! -x $bin/kind ]]; then
  log "building kind $KIND_VERSION from sigs.k8s.io/kind"
  mkdir -p "$bin"
  # Built into a temporary folder first, so an interrupted build never leaves a binary
  # that the check above would take for a finished one.
  tmp=$(mktemp -d)
  CGO_ENABLED=0 GOBIN=$tmp go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kind@$KIND_VERSION"
  mv "$tmp/kind" "$bin/kind"
  rmdir "$tmp"
fi
echo "$bin/kind"
