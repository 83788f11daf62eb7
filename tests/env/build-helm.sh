#!/usr/bin/env bash
# Installs helm from its Go module (it has no replace directives, so `go install` works).
source "$(dirname "$0")/lib.sh"
[[ -x $HELM_BIN/helm ]] && { log "helm $HELM_VERSION already built"; exit 0; }
mkdir -p "$HELM_BIN"
log "building helm $HELM_VERSION"
CGO_ENABLED=0 GOBIN=$HELM_BIN go install -trimpath \
  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
  "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
"$HELM_BIN/helm" version --short
