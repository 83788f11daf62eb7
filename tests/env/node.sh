#!/usr/bin/env bash
# The test bed's one real node: containerd + runc + CNI plugins (Debian packages), the
# kubelet and kube-proxy built from source, and a locally built pause image.
#   node.sh up | down
# Settings these VMs need (see docs/testbed.md): cgroupfs everywhere (PID 1 is not
# systemd; cgroups are v1), restrict_oom_score_adj (root lacks CAP_SYS_RESOURCE),
# oomScoreAdj 0 for the kubelet, CNI plugins in /usr/lib/cni, shared mount propagation.
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
PKI=$SLUICE_STATE/pki
NODE_STATE=$SLUICE_STATE/node

write_containerd_config() {
  mkdir -p "$NODE_STATE/cni/net.d" "$CONTAINERD_ROOT" "$CONTAINERD_STATE"
  cat >"$NODE_STATE/containerd.toml" <<TOML
version = 2
root = "$CONTAINERD_ROOT"
state = "$CONTAINERD_STATE"
[grpc]
  address = "$CONTAINERD_SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # root here lacks CAP_SYS_RESOURCE: never lower a container's oom_score_adj
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE_STATE/cni/net.d"
TOML
  # Pods get addresses on the bridge and a route to its gateway (the host) only: no IP
  # masquerading, and forwarding off the bridge is dropped, so pod traffic never leaves
  # this machine.
  cat >"$NODE_STATE/cni/net.d/10-sluice.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "sluice",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE_NAME",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR", "rangeStart": "${BRIDGE_GATEWAY%.*}.10", "gateway": "$BRIDGE_GATEWAY"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
}

build_pause_image() {
  if ctr_k8s images ls -q 2>/dev/null | grep -qx "$PAUSE_IMAGE"; then return 0; fi
  mkdir -p "$SLUICE_CACHE/images"
  gcc -static -Os -o "$SLUICE_CACHE/images/pause" "$here/image/pause.c"
  python3 "$here/image/oci-image.py" --name "$PAUSE_IMAGE" --user 65535:65535 \
    --out "$SLUICE_CACHE/images/pause.tar" --entrypoint /pause "$SLUICE_CACHE/images/pause:/pause" >/dev/null
  ctr_k8s images import "$SLUICE_CACHE/images/pause.tar" >/dev/null
  log "imported pause image $PAUSE_IMAGE"
}

write_kubelet_config() {
  mkdir -p "$NODE_STATE"
  # Pods resolve names through their own loopback, where nothing answers: lookups fail
  # fast and never leave the machine. Tests address everything by IP.
  echo "nameserver 127.0.0.1" >"$NODE_STATE/resolv.conf"
  cat >"$NODE_STATE/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
failSwapOn: false
oomScoreAdj: 0
resolvConf: $NODE_STATE/resolv.conf
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $PKI/ca.crt}
authorization:
  mode: AlwaysAllow
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
# Images are imported, never pulled: keep them all (no image garbage collection) and do
# not evict pods for disk pressure on a shared development disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
serializeImagePulls: false
maxPods: 250
shutdownGracePeriod: 0s
YAML
}

up() {
  [[ -x $K8S_BIN/kubelet && -x $K8S_BIN/kube-proxy ]] || bash "$here/build-kubernetes.sh"
  bash "$here/install-deps.sh"
  ensure_bridge
  # Pods on the bridge may reach the host; nothing they send is forwarded elsewhere.
  iptables -C FORWARD -i "$BRIDGE_NAME" ! -o "$BRIDGE_NAME" -j DROP 2>/dev/null \
    || iptables -I FORWARD -i "$BRIDGE_NAME" ! -o "$BRIDGE_NAME" -j DROP
  swapoff -a 2>/dev/null || true
  mount --make-rshared /

  write_containerd_config
  start_daemon containerd containerd --config "$NODE_STATE/containerd.toml"
  wait_for containerd "$SLUICE_LOGS/containerd.log" 60 ctr --address "$CONTAINERD_SOCK" version
  build_pause_image

  write_kubelet_config
  start_daemon kubelet "$K8S_BIN/kubelet" --config="$NODE_STATE/kubelet.yaml" \
    --kubeconfig="$PKI/kubelet.kubeconfig" --hostname-override="$NODE_NAME" \
    --node-ip="$BRIDGE_GATEWAY" --root-dir=/var/lib/sluice/kubelet
  wait_for kubelet "$SLUICE_LOGS/kubelet.log" 120 curl -fsS http://127.0.0.1:10248/healthz

  start_daemon kube-proxy "$K8S_BIN/kube-proxy" --kubeconfig="$PKI/kube-proxy.kubeconfig" \
    --hostname-override="$NODE_NAME" --cluster-cidr="$POD_CIDR" --proxy-mode=iptables \
    --conntrack-max-per-core=0 --metrics-bind-address=127.0.0.1:10249 \
    --healthz-bind-address=127.0.0.1:10256 --nodeport-addresses=primary
  wait_for "node $NODE_NAME Ready" "$SLUICE_LOGS/kubelet.log" 120 node_ready
  log "node $NODE_NAME ready"
}

node_ready() {
  "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" get node "$NODE_NAME" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' | grep -qx True
}

down() {
  stop_daemon kube-proxy
  stop_daemon kubelet
  # Remove every pod sandbox before containerd goes, so no runc processes linger.
  if [[ -S $CONTAINERD_SOCK ]]; then
    for t in $(ctr_k8s tasks ls -q 2>/dev/null); do ctr_k8s tasks kill -s KILL "$t" 2>/dev/null || true; done
  fi
  stop_daemon containerd
  pkill -f "containerd-shim-runc-v2 -namespace k8s.io -address $CONTAINERD_SOCK" 2>/dev/null || true
  # Unmount what the kubelet mounted (secrets, configmaps) so the next start is clean.
  grep -o "/var/lib/sluice/kubelet[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  grep -o "$CONTAINERD_STATE[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
}

case ${1:-up} in
  up) up ;;
  down) down ;;
  *) die "usage: node.sh up|down" ;;
esac
