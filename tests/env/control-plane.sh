#!/usr/bin/env bash
# The test bed's Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager
# and kube-scheduler, built from source (build-kubernetes.sh, build-etcd.sh).
#   control-plane.sh up | down
# Flags follow the minimal set envtest uses, plus what a real node needs: RBAC and Node
# authorization, service-account token signing, and the controller-manager's signer.
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
PKI=$SLUICE_STATE/pki

up() {
  [[ -x $K8S_BIN/kube-apiserver ]] || bash "$here/build-kubernetes.sh"
  [[ -x $ETCD_BIN/etcd ]] || bash "$here/build-etcd.sh"
  bash "$here/pki.sh"
  ensure_bridge   # the API server advertises the bridge gateway, where pods reach it

  mkdir -p "$SLUICE_STATE/etcd"
  start_daemon etcd "$ETCD_BIN/etcd" --name sluice --data-dir "$SLUICE_STATE/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster sluice=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381 \
    --unsafe-no-fsync --quota-backend-bytes 4294967296 --log-level warn
  wait_for etcd "$SLUICE_LOGS/etcd.log" 60 curl -fsS http://127.0.0.1:2381/health

  start_daemon kube-apiserver "$K8S_BIN/kube-apiserver" \
    --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=0.0.0.0 --secure-port="$APISERVER_PORT" --advertise-address="$BRIDGE_GATEWAY" \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --authorization-mode=Node,RBAC \
    --kubelet-preferred-address-types=InternalIP \
    --allow-privileged=true --profiling=false \
    --event-ttl=1h
  wait_for kube-apiserver "$SLUICE_LOGS/kube-apiserver.log" 120 \
    curl -fsS --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "https://127.0.0.1:$APISERVER_PORT/readyz"

  start_daemon kube-controller-manager "$K8S_BIN/kube-controller-manager" \
    --kubeconfig="$PKI/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$PKI/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$PKI/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=10257 \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --use-service-account-credentials=true --leader-elect=false \
    --allocate-node-cidrs=false --service-cluster-ip-range="$SERVICE_CIDR" \
    --concurrent-deployment-syncs=10 --concurrent-gc-syncs=20
  start_daemon kube-scheduler "$K8S_BIN/kube-scheduler" \
    --kubeconfig="$PKI/scheduler.kubeconfig" \
    --authentication-kubeconfig="$PKI/scheduler.kubeconfig" \
    --authorization-kubeconfig="$PKI/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=10259 --leader-elect=false
  wait_for kube-controller-manager "$SLUICE_LOGS/kube-controller-manager.log" 60 \
    curl -fsSk https://127.0.0.1:10257/healthz
  wait_for kube-scheduler "$SLUICE_LOGS/kube-scheduler.log" 60 \
    curl -fsSk https://127.0.0.1:10259/healthz
  log "control plane ready: export KUBECONFIG=$KUBECONFIG_PATH"
}

down() {
  for c in kube-scheduler kube-controller-manager kube-apiserver etcd; do stop_daemon "$c"; done
}

case ${1:-up} in
  up) up ;;
  down) down ;;
  *) die "usage: control-plane.sh up|down" ;;
esac
