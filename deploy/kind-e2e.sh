#!/usr/bin/env bash
# The order -> inventory scenario on kind, for people with Docker.
#
#   bash deploy/kind-e2e.sh            # build images, create the cluster, run the demo
#   KEEP=1 bash deploy/kind-e2e.sh     # keep the cluster afterwards (default: deleted)
#
# Needs: docker, kind (v0.23+, Kubernetes >= 1.29 node image), kubectl, helm 3, and a Rust
# toolchain for the host-side order service. It is NOT part of `make test`: the project's
# own test bed runs without Docker (tests/env, `make test`, `make demo`). This script was
# written alongside that test bed but could not be executed there (no Docker on those
# machines); treat it as a starting point and report what breaks.
#
# What it does:
#   1. builds sluice.dev/{operator,consumer,inventory}:dev with deploy/Dockerfile;
#   2. creates a kind cluster and loads the images into it;
#   3. deploys a single-node Kafka (KRaft, apache/kafka image) into namespace kafka;
#   4. installs the chart (2 operator replicas, leader election) into sluice-system;
#   5. runs the order service on the host: it publishes through a port-forward to Kafka
#      and receives the inventory pods' receipts on the Docker network's gateway address.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cluster=${CLUSTER:-sluice-e2e}
tag=${IMAGE_TAG:-dev}
kafka_image=${KAFKA_IMAGE:-apache/kafka:3.9.1}
log() { printf '[kind-e2e] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in docker kind kubectl helm cargo; do
  command -v "$tool" >/dev/null || die "$tool is required (this script is for machines with Docker and kind)"
done

cleanup() {
  [[ -n ${pf_pid:-} ]] && kill "$pf_pid" 2>/dev/null || true
  if [[ ${KEEP:-0} != 1 ]]; then
    log "deleting kind cluster $cluster (KEEP=1 keeps it)"
    kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

log "building images with deploy/Dockerfile"
for target in operator consumer inventory; do
  docker build -f "$root/deploy/Dockerfile" --target "$target" -t "sluice.dev/$target:$tag" "$root"
done

if ! kind get clusters | grep -qx "$cluster"; then
  log "creating kind cluster $cluster"
  kind create cluster --name "$cluster" --wait 120s
fi
kubectl config use-context "kind-$cluster" >/dev/null
for target in operator consumer inventory; do
  kind load docker-image --name "$cluster" "sluice.dev/$target:$tag"
done

log "deploying a single-node Kafka (KRaft) into namespace kafka"
kubectl create namespace kafka --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -n kafka -f - <<YAML
apiVersion: v1
kind: Service
metadata: {name: kafka}
spec:
  selector: {app: kafka}
  ports:
  - {name: broker, port: 9092}
  - {name: host, port: 9094}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: kafka}
spec:
  replicas: 1
  selector: {matchLabels: {app: kafka}}
  template:
    metadata: {labels: {app: kafka}}
    spec:
      containers:
      - name: kafka
        image: $kafka_image
        ports: [{containerPort: 9092}, {containerPort: 9094}]
        env:
        - {name: KAFKA_NODE_ID, value: "1"}
        - {name: KAFKA_PROCESS_ROLES, value: "broker,controller"}
        - {name: KAFKA_LISTENERS, value: "PLAINTEXT://:9092,HOST://:9094,CONTROLLER://:9093"}
        - {name: KAFKA_ADVERTISED_LISTENERS, value: "PLAINTEXT://kafka.kafka.svc:9092,HOST://127.0.0.1:9094"}
        - {name: KAFKA_LISTENER_SECURITY_PROTOCOL_MAP, value: "PLAINTEXT:PLAINTEXT,HOST:PLAINTEXT,CONTROLLER:PLAINTEXT"}
        - {name: KAFKA_CONTROLLER_LISTENER_NAMES, value: "CONTROLLER"}
        - {name: KAFKA_CONTROLLER_QUORUM_VOTERS, value: "1@localhost:9093"}
        - {name: KAFKA_INTER_BROKER_LISTENER_NAME, value: "PLAINTEXT"}
        - {name: KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR, value: "1"}
        - {name: KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR, value: "1"}
        - {name: KAFKA_TRANSACTION_STATE_LOG_MIN_ISR, value: "1"}
        - {name: KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS, value: "0"}
        - {name: KAFKA_AUTO_CREATE_TOPICS_ENABLE, value: "false"}
        readinessProbe:
          tcpSocket: {port: 9092}
          periodSeconds: 2
YAML
kubectl -n kafka rollout status deploy/kafka --timeout=300s

log "installing the chart"
kubectl create namespace sluice-system --dry-run=client -o yaml | kubectl apply -f -
kubectl label namespace sluice-system --overwrite pod-security.kubernetes.io/enforce=restricted
helm upgrade --install sluice "$root/charts/sluice" --namespace sluice-system \
  --set operator.image.tag="$tag" --set sidecar.image.tag="$tag" \
  --set operator.image.pullPolicy=Never --wait --timeout 180s

# The host reaches Kafka through a port-forward of the HOST listener (advertised as
# 127.0.0.1:9094); the pods use the in-cluster Service.
kubectl -n kafka port-forward svc/kafka 9094:9094 >/dev/null 2>&1 &
pf_pid=$!
sleep 3

# The pods send receipts to the host: the kind network's gateway is the host as the node
# container sees it, and pod traffic to it is masqueraded by kind's node.
gateway=$(docker network inspect kind -f '{{range .IPAM.Config}}{{if .Gateway}}{{.Gateway}} {{end}}{{end}}' | tr ' ' '\n' | grep -E '^[0-9]+\.' | head -1)
[[ -n $gateway ]] || die "cannot find the kind network's IPv4 gateway"

log "building the order service and running the scenario (receipts on $gateway)"
(cd "$root" && cargo build --release --locked -p sluice-examples --bin order-service)
target_dir=${CARGO_TARGET_DIR:-$root/target}
"$target_dir/release/order-service" \
  --kafka 127.0.0.1:9094 \
  --pod-kafka kafka.kafka.svc:9092 \
  --listen-ip "$gateway" \
  --namespace sluice-demo \
  --image "sluice.dev/inventory:$tag" \
  --kubectl kubectl
