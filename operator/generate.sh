#!/usr/bin/env bash
# Writes the generated artefacts: the EventConsumer CRD into crds/ and the Helm chart's
# files/ (charts/sluice/templates/crd.yaml templates it, so `helm upgrade` updates it).
# `make generate` runs this; `cargo test -p sluice-operator` fails when they drift.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
yaml="$(mktemp)"
trap 'rm -f "$yaml"' EXIT
cargo run --quiet -p sluice-operator --bin sluice-operator -- crd >"$yaml"
for dir in crds charts/sluice/files; do
  mkdir -p "$dir"
  cp "$yaml" "$dir/eventconsumers.sluice.dev.yaml"
  echo "wrote $dir/eventconsumers.sluice.dev.yaml"
done
