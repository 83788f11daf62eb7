#!/usr/bin/env bash
# Brings the whole test bed up (idempotent): Kafka (the single broker and the secured
# three-node cluster), the control plane, the node, helm.
# Writes $SLUICE_STATE/env (KEY=VALUE lines) that tests and people can source.
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
[[ $(id -u) == 0 ]] || die "the test bed needs root (it runs a kubelet, containerd and a bridge)"

# Builds first (each is cached and skipped when present); the long one first.
bash "$here/build-kubernetes.sh"
bash "$here/build-etcd.sh"
bash "$here/build-helm.sh"
promtool=$(bash "$here/build-promtool.sh" prometheus)   # the chart's alerts and dashboard

bash "$here/kafka.sh" up
bash "$here/kafka-cluster.sh" up
bash "$here/control-plane.sh" up
bash "$here/node.sh" up
bash "$here/registry.sh" up

cat >"$SLUICE_STATE/env" <<ENV
KUBECONFIG=$KUBECONFIG_PATH
SLUICE_KUBECTL=$K8S_BIN/kubectl
SLUICE_HELM=$HELM_BIN/helm
SLUICE_PROMTOOL=$promtool
SLUICE_REGISTRY=$(bash "$here/registry.sh" info)
SLUICE_E2E_REGISTRY=$(bash "$here/registry.sh" info)/e2e
SLUICE_NODE_CTR="ctr --address $CONTAINERD_SOCK"
SLUICE_KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_HOST_PORT
SLUICE_KAFKA_POD_BOOTSTRAP=$BRIDGE_GATEWAY:$KAFKA_POD_PORT
SLUICE_KAFKA_INFO="$here/kafka.sh info"
SLUICE_IMAGE="$here/image.sh"
SLUICE_HOST_IP=$BRIDGE_GATEWAY
SLUICE_LOGS=$SLUICE_LOGS
PATH=$K8S_BIN:$HELM_BIN:\$PATH
ENV
bash "$here/kafka-cluster.sh" env >>"$SLUICE_STATE/env"

cat <<MSG

Sluice test bed is up.
  kubectl:      export KUBECONFIG=$KUBECONFIG_PATH PATH=$K8S_BIN:$HELM_BIN:\$PATH
                (or: set -a; source $SLUICE_STATE/env; set +a)
  Kafka:        127.0.0.1:$KAFKA_HOST_PORT from the host, $BRIDGE_GATEWAY:$KAFKA_POD_PORT from pods
  Kafka x3:     secured three-node cluster, addresses in $SLUICE_STATE/env (SLUICE_KAFKA_CLUSTER_*)
  node:         $NODE_NAME (pods on $POD_CIDR, bridge $BRIDGE_NAME)
  logs:         $SLUICE_LOGS
  stop:         make env-down
MSG
