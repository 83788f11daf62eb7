#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy and kubectl
# from the upstream Go modules into $SLUICE_CACHE/kubernetes/<version>/bin.
#
# `go install k8s.io/kubernetes/cmd/...@vX` is refused because k8s.io/kubernetes's go.mod
# replaces its staging modules with local folders. A throwaway wrapper module that requires
# k8s.io/kubernetes and replaces each staging module with its published twin
# (k8s.io/<name> v0.<minor>.<patch>) builds the same code. The staging list and the
# go/godebug lines are read from the release's own go.mod, so a version bump needs no edits.
source "$(dirname "$0")/lib.sh"

[[ -x $K8S_BIN/kubelet && -x $K8S_BIN/kube-apiserver && -x $K8S_BIN/kubectl && -x $K8S_BIN/kube-proxy ]] && { log "kubernetes $KUBERNETES_VERSION already built in $K8S_BIN"; exit 0; }

work=$SLUICE_CACHE/build/kubernetes-$KUBERNETES_VERSION
mkdir -p "$work" "$K8S_BIN"
cd "$work"

log "downloading k8s.io/kubernetes@$KUBERNETES_VERSION's go.mod"
upstream_gomod=$(GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
staging_version=v0.${KUBERNETES_VERSION#v1.}

{
  echo "module sluice.dev/testbed/kubernetes"
  echo
  grep -E '^(go|godebug) ' "$upstream_gomod" || true
  # godebug blocks: copy "godebug (" ... ")" verbatim
  awk '/^godebug \($/{p=1} p{print} p&&/^\)$/{p=0}' "$upstream_gomod"
  echo
  echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
  echo
  echo "replace ("
  grep -oE 'k8s\.io/[a-z0-9-]+ => \./staging/src/k8s\.io/[a-z0-9-]+' "$upstream_gomod" \
    | awk -v v="$staging_version" '{print "\t" $1 " => " $1 " " v}'
  echo ")"
} >go.mod

cat >tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
GO

log "resolving modules (go mod tidy)"
GOFLAGS=-mod=mod go mod tidy

minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

log "building kubernetes $KUBERNETES_VERSION (cold: 10-25 minutes on 2 cores)"
CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$K8S_BIN/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kubelet \
  k8s.io/kubernetes/cmd/kubectl \
  k8s.io/kubernetes/cmd/kube-proxy
"$K8S_BIN/kube-apiserver" --version
log "kubernetes binaries in $K8S_BIN"
