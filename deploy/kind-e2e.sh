#!/usr/bin/env bash
# The end-to-end tests (tests/tests/e2e_node.rs) on a kind cluster, for machines with Docker
# (or rootful Podman: KIND_EXPERIMENTAL_PROVIDER=podman).
#
#   bash deploy/kind-e2e.sh                     # every e2e test
#   bash deploy/kind-e2e.sh rolling_update      # cargo test's name filter, and its flags
#   KEEP=1 bash deploy/kind-e2e.sh              # keep the cluster, registry and Kafka
#   KIND_E2E_DRY_RUN=1 bash deploy/kind-e2e.sh  # print the commands, run none
#
# Needs: docker (or podman), kubectl, helm 3 (on PATH), Go (kind is built from its Go
# module, tests/env/build-kind.sh, crane likewise), a JDK 17 with Maven (the Kafka the
# tests restart runs on this host) and Rust. Nothing here needs the project's own test bed.
#
# What it does, in order:
#   1. builds the release binaries and writes the images as OCI archives (tests/env/image.sh,
#      as `make images`; no Docker build);
#   2. starts a registry container (registry:2) published on localhost:$KIND_REGISTRY_PORT
#      and attached to the kind network, and creates the cluster from deploy/kind/cluster.yaml
#      with each node's containerd mapping localhost:$KIND_REGISTRY_PORT to it (kind's
#      documented local-registry pattern), so one image name works from the host and nodes;
#   3. pushes the images with tests/env/push.sh (what `make push` runs);
#   4. starts Kafka on this host with the project's scripts — the single broker
#      (tests/env/kafka.sh) and the secured three-node cluster (tests/env/kafka-cluster.sh),
#      whose brokers the tests stop, SIGKILL and reconfigure — with their pod listeners on
#      the kind network's gateway, which pods reach. Unless SLUICE_KAFKA_BOOTSTRAP and
#      SLUICE_KAFKA_POD_BOOTSTRAP are given: then that Kafka is used (the secured-cluster
#      tests then need the SLUICE_KAFKA_CLUSTER_* variables of kafka-cluster.sh too);
#   5. runs `cargo test --release --locked -p sluice-tests --test e2e_node` with the cluster,
#      registry and Kafka in the environment (see tests/tests/e2e_node.rs): the chart and
#      the EventConsumers pull the images from the registry with IfNotPresent;
#   6. deletes the cluster and the registry and stops Kafka (unless KEEP=1).
#
# Settings: KIND_CLUSTER (sluice-e2e), KIND_REGISTRY_PORT (5001), KIND_REGISTRY_IMAGE
# (registry:2), IMAGE_TAG (dev), SLUICE_KIND_STATE (~/.cache/sluice/kind-state: Kafka's
# data, logs and the kubeconfig).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
env_dir=$root/tests/env
config=$root/deploy/kind/cluster.yaml
cluster=${KIND_CLUSTER:-sluice-e2e}
reg_name=${KIND_REGISTRY_NAME:-kind-registry}
reg_port=${KIND_REGISTRY_PORT:-5001}
reg_image=${KIND_REGISTRY_IMAGE:-registry:2}
registry=localhost:$reg_port/sluice
tag=${IMAGE_TAG:-dev}
engine=${KIND_EXPERIMENTAL_PROVIDER:-docker}
dry=${KIND_E2E_DRY_RUN:-0}
state=${SLUICE_KIND_STATE:-${SLUICE_CACHE:-$HOME/.cache/sluice}/kind-state}
target_dir=${CARGO_TARGET_DIR:-${SLUICE_CACHE:-$HOME/.cache/sluice}/target}
kubeconfig=$state/kubeconfig

log() { printf '[kind-e2e] %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
# run CMD...: runs it, or with KIND_E2E_DRY_RUN=1 prints it (shell-quoted) instead.
run() {
  if [[ $dry == 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}
# feed TEXT CMD...: runs CMD with TEXT on its standard input (printed too in a dry run).
feed() {
  local text=$1
  shift
  if [[ $dry == 1 ]]; then
    run "$@"
    printf '%s\n' "$text" | sed 's/^/  < /'
  else
    printf '%s\n' "$text" | "$@"
  fi
}
# query PLACEHOLDER CMD...: CMD's output, or PLACEHOLDER in a dry run (nothing exists yet).
query() {
  local placeholder=$1
  shift
  if [[ $dry == 1 ]]; then echo "$placeholder"; else "$@"; fi
}

case $engine in
  docker | podman) ;;
  *) die "KIND_EXPERIMENTAL_PROVIDER=$engine: this script supports docker or podman" ;;
esac
[[ -f $config ]] || die "the cluster config $config is missing"
kind=$(bash "$env_dir/build-kind.sh")
if [[ $dry != 1 ]]; then
  for tool in "$engine" kubectl helm cargo go java mvn; do
    command -v "$tool" >/dev/null || die "$tool is required (see the comment at the top of $0)"
  done
fi
kubectl_bin=$(command -v kubectl || echo kubectl)
helm_bin=$(command -v helm || echo helm)

kafka_given=0
if [[ -n ${SLUICE_KAFKA_BOOTSTRAP:-} && -n ${SLUICE_KAFKA_POD_BOOTSTRAP:-} ]]; then
  kafka_given=1
fi

cleanup() {
  local rc=$?
  if [[ ${KEEP:-0} == 1 ]]; then
    log "KEEP=1: kept cluster $cluster (KUBECONFIG=$kubeconfig), registry $reg_name, Kafka"
    return "$rc"
  fi
  log "deleting cluster $cluster and registry $reg_name, stopping Kafka (KEEP=1 keeps them)"
  if [[ $kafka_given == 0 ]]; then
    run env SLUICE_STATE="$state" bash "$env_dir/kafka-cluster.sh" down || true
    run env SLUICE_STATE="$state" bash "$env_dir/kafka.sh" down || true
  fi
  run env KIND_EXPERIMENTAL_PROVIDER="$engine" "$kind" delete cluster --name "$cluster" \
    --kubeconfig "$kubeconfig" || true
  run "$engine" rm -f "$reg_name" || true
  return "$rc"
}
trap cleanup EXIT

# 1. The images, as `make images` writes them (OCI archives under ~/.cache/sluice/images).
log "building the release binaries and the image archives"
run cargo build --release --locked --workspace --bins --manifest-path "$root/Cargo.toml"
for pair in operator:sluice-operator consumer:sluice-consumer testapp:sluice-testapp; do
  run bash "$env_dir/image.sh" "sluice.dev/${pair%%:*}:$tag" "$target_dir/release/${pair#*:}"
done

# 2. The registry and the cluster (kind's local-registry pattern).
running=$(query false "$engine" inspect -f '{{.State.Running}}' "$reg_name" 2>/dev/null || true)
if [[ $running != true ]]; then
  log "starting registry $reg_name ($reg_image) on localhost:$reg_port"
  run "$engine" run -d --restart=always -p "127.0.0.1:$reg_port:5000" --network bridge \
    --name "$reg_name" "$reg_image"
fi
run mkdir -p "$state"
clusters=$(query "" env KIND_EXPERIMENTAL_PROVIDER="$engine" "$kind" get clusters 2>/dev/null || true)
if ! grep -qx "$cluster" <<<"$clusters"; then
  log "creating kind cluster $cluster from $config"
  run env KIND_EXPERIMENTAL_PROVIDER="$engine" "$kind" create cluster --name "$cluster" \
    --config "$config" --kubeconfig "$kubeconfig" --wait 180s
fi
nodes=$(query "$cluster-control-plane" env KIND_EXPERIMENTAL_PROVIDER="$engine" "$kind" get nodes --name "$cluster")
for node in $nodes; do
  run "$engine" exec "$node" mkdir -p "/etc/containerd/certs.d/localhost:$reg_port"
  feed "[host.\"http://$reg_name:5000\"]" \
    "$engine" exec -i "$node" cp /dev/stdin "/etc/containerd/certs.d/localhost:$reg_port/hosts.toml"
done
attached=$(query null "$engine" inspect -f '{{json .NetworkSettings.Networks.kind}}' "$reg_name")
if [[ $attached == null ]]; then
  run "$engine" network connect kind "$reg_name"
fi
feed "apiVersion: v1
kind: ConfigMap
metadata:
  name: local-registry-hosting
  namespace: kube-public
data:
  localRegistryHosting.v1: |
    host: \"localhost:$reg_port\"
    help: \"https://kind.sigs.k8s.io/docs/user/local-registry/\"" \
  kubectl --kubeconfig "$kubeconfig" apply -f -

# 3. Push the images (the tests push them again by digest; the blobs are then there).
log "pushing the images to $registry"
run bash "$env_dir/push.sh" "$registry" "$tag" operator consumer testapp

# 4. Kafka on this host, its pod listeners on the kind network's gateway.
if [[ $engine == podman ]]; then
  gateway_format='{{range .Subnets}}{{.Gateway}} {{end}}'
else
  gateway_format='{{range .IPAM.Config}}{{if .Gateway}}{{.Gateway}} {{end}}{{end}}'
fi
gateway=$(query "<kind-gateway>" "$engine" network inspect kind -f "$gateway_format" |
  tr ' ' '\n' | grep -E '^[0-9]+\.|^<' | head -1)
[[ -n $gateway ]] || die "cannot find the kind network's IPv4 gateway"
kafka_env=()
if [[ $kafka_given == 0 ]]; then
  log "starting Kafka (single broker and secured three-node cluster), pod listeners on $gateway"
  # The gateway address is on the kind network's bridge already: the scripts use it as is.
  for script in kafka.sh kafka-cluster.sh; do
    run env SLUICE_STATE="$state" BRIDGE_GATEWAY="$gateway" SLUICE_EXTERNAL_BRIDGE=1 \
      bash "$env_dir/$script" up
  done
  # (BRIDGE_GATEWAY and SLUICE_EXTERNAL_BRIDGE for kafka-cluster.sh, which the tests run to
  # restart brokers.)
  kafka_env=(
    BRIDGE_GATEWAY="$gateway"
    SLUICE_EXTERNAL_BRIDGE=1
    SLUICE_KAFKA_BOOTSTRAP=127.0.0.1:9092
    SLUICE_KAFKA_POD_BOOTSTRAP="$gateway:9094"
    SLUICE_KAFKA_INFO="$env_dir/kafka.sh info"
  )
  cluster_env=$(query "SLUICE_KAFKA_CLUSTER_BOOTSTRAP=<from kafka-cluster.sh env>" \
    env SLUICE_STATE="$state" BRIDGE_GATEWAY="$gateway" bash "$env_dir/kafka-cluster.sh" env)
  # (KEY=VALUE lines, a value with spaces in double quotes, which `env` must not see.)
  while IFS= read -r line; do
    [[ $line == *=\"*\" ]] && line=${line/=\"/=} && line=${line%\"}
    [[ -n $line ]] && kafka_env+=("$line")
  done <<<"$cluster_env"
fi

# 5. The end-to-end tests, with everything they use from the environment.
log "running the end-to-end tests against kind cluster $cluster"
(cd "$root" && run env \
  KUBECONFIG="$kubeconfig" \
  SLUICE_STATE="$state" \
  SLUICE_LOGS="$state/logs" \
  SLUICE_KUBECTL="$kubectl_bin" \
  SLUICE_HELM="$helm_bin" \
  SLUICE_E2E_REGISTRY="$registry" \
  SLUICE_IMAGE_TAG="$tag" \
  SLUICE_HOST_IP="$gateway" \
  SLUICE_NODE_CTR="$engine exec $cluster-control-plane ctr" \
  "${kafka_env[@]}" \
  cargo test --release --locked -p sluice-tests --test e2e_node -- --nocapture "$@")
