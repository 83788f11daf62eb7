#!/usr/bin/env bash
# Builds kind (Kubernetes in Docker/Podman/nerdctl) from its Go module sigs.k8s.io/kind into
# $SLUICE_CACHE/kind/<version>/bin, for deploy/kind-e2e.sh and the test that loads that
# script's cluster config through kind (tests/tests/kind_e2e.rs). Idempotent: an existing
# binary is kept. Prints the binary's path.
source "$(dirname "$0")/lib.sh"
# v0.30.0: its default node image is Kubernetes 1.34, the test bed's version.
KIND_VERSION=${KIND_VERSION:-v0.30.0}
bin=$SLUICE_CACHE/kind/$KIND_VERSION/bin
go_install_tool "$bin" "sigs.k8s.io/kind@$KIND_VERSION"
echo "$bin/kind"
