#!/usr/bin/env bash
# Renders the Helm chart into plain manifests for people who use kubectl only:
#   bash deploy/manifests/render.sh > deploy/manifests/sluice.yaml     (make manifests)
# The output installs the CRD, the namespace sluice-system (Pod Security "restricted"
# enforced) and the operator with the chart's default values. tests/tests/chart.rs fails
# when deploy/manifests/sluice.yaml differs from what this prints.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
helm=${SLUICE_HELM:-helm}
cat <<'HEADER'
# Sluice — plain manifests rendered from charts/sluice (do not edit; `make manifests`).
#   kubectl apply --server-side -f deploy/manifests/sluice.yaml
# Images: sluice.dev/operator:0.1.0 and sluice.dev/consumer:0.1.0 (build them with
# deploy/Dockerfile, or use the Helm chart to choose others).
apiVersion: v1
kind: Namespace
metadata:
  name: sluice-system
  labels:
    pod-security.kubernetes.io/enforce: restricted
    pod-security.kubernetes.io/enforce-version: latest
---
HEADER
# --kube-version: without a cluster helm assumes v1.20, below the chart's kubeVersion.
"$helm" template sluice "$root/charts/sluice" --namespace sluice-system --include-crds --kube-version 1.34.0
