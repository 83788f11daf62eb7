#!/usr/bin/env bash
# Builds promtool (and, with the argument `prometheus`, the Prometheus server) from
# Prometheus' Go module into $SLUICE_CACHE/prometheus/<version>/bin. Idempotent: a binary
# that is already there is kept. Used by tests/tests/monitoring*.rs to check the chart's
# PrometheusRule and Grafana dashboard queries.
source "$(dirname "$0")/lib.sh"
PROMETHEUS_MODULE_VERSION=${PROMETHEUS_MODULE_VERSION:-v0.316.0}
bin=$SLUICE_CACHE/prometheus/$PROMETHEUS_MODULE_VERSION/bin
mkdir -p "$bin"
for cmd in promtool "$@"; do
  if [[ -x $bin/$cmd ]]; then
    log "$cmd (prometheus module $PROMETHEUS_MODULE_VERSION) already built"
    continue
  fi
  log "building $cmd from github.com/prometheus/prometheus@$PROMETHEUS_MODULE_VERSION"
  # Built into a temporary folder first, so an interrupted build never leaves a binary
  # that the check above would take for a finished one.
  tmp=$(mktemp -d)
  CGO_ENABLED=0 GOBIN=$tmp go install -trimpath -ldflags "-s -w" \
    "github.com/prometheus/prometheus/cmd/$cmd@$PROMETHEUS_MODULE_VERSION"
  mv "$tmp/$cmd" "$bin/$cmd"
  rmdir "$tmp"
done
"$bin/promtool" --version | head -n1 >&2
echo "$bin/promtool"
