#!/usr/bin/env bash
# Builds etcd from its Go module into $SLUICE_CACHE/etcd/<version>/bin. Like Kubernetes,
# go.etcd.io/etcd/server/v3 has replace directives, so `go install` is refused; a wrapper
# module that requires it builds its main package. (Debian's etcd 3.4 is older than
# Kubernetes 1.34 supports.)
source "$(dirname "$0")/lib.sh"
[[ -x $ETCD_BIN/etcd ]] && { log "etcd $ETCD_VERSION already built"; exit 0; }
work=$SLUICE_CACHE/build/etcd-$ETCD_VERSION
mkdir -p "$work" "$ETCD_BIN"
cd "$work"
cat >go.mod <<MOD
module sluice.dev/testbed/etcd

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
MOD
cat >tools.go <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
GOFLAGS=-mod=mod go mod tidy
log "building etcd $ETCD_VERSION"
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$ETCD_BIN/etcd" go.etcd.io/etcd/server/v3
"$ETCD_BIN/etcd" --version
