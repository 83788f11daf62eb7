#!/usr/bin/env bash
# Builds promtool (and, with the argument `prometheus`, the Prometheus server) from
# Prometheus' Go module into $SLUICE_CACHE/prometheus/<version>/bin. Idempotent: a binary
# that is already there is kept. Used by tests/tests/monitoring*.rs to check the chart's
# PrometheusRule and Grafana dashboard queries.
source "$(dirname "$0")/lib.sh"
PROMETHEUS_MODULE_VERSION=${PROMETHEUS_MODULE_VERSION:-v0.316.0}
bin=$SLUICE_CACHE/prometheus/$PROMETHEUS_MODULE_VERSION/bin
for cmd in promtool "$@"; do
  go_install_tool "$bin" "github.com/prometheus/prometheus/cmd/$cmd@$PROMETHEUS_MODULE_VERSION"
done
"$bin/promtool" --version | head -n1 >&2
echo "$bin/promtool"
