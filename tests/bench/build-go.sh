#!/usr/bin/env bash
# Builds the Go baselines of `make bench` (tests/bench/go: kafka-go per-record commit, sarama
# in-process) from the Go module proxy, idempotently: modules and build cache under
# ~/.cache/sluice/go, binaries under ~/.cache/sluice/bench/bin, rebuilt only when the sources
# change. Prints the binaries' directory.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/go" && pwd)"
cache="${SLUICE_CACHE:-$HOME/.cache/sluice}"
out="$cache/bench/bin"
command -v go >/dev/null || { echo "build-go.sh: the go command is required (a prerequisite, see README)" >&2; exit 1; }
export GOTOOLCHAIN=local GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" GOFLAGS=-mod=readonly
mkdir -p "$out"
hash="$(cd "$root" && cat go.mod go.sum */main.go | sha256sum | cut -c1-16)-$(go env GOVERSION)"
if [[ "$(cat "$out/.hash" 2>/dev/null)" != "$hash" || ! -x "$out/kafkago" || ! -x "$out/sarama" ]]; then
  (cd "$root" && go build -o "$out/kafkago" ./kafkago && go build -o "$out/sarama" ./sarama) >&2
  echo "$hash" > "$out/.hash"
fi
echo "$out"
