# Shared settings and helpers for the Sluice test bed scripts. Sourced, not executed.
# Everything built or downloaded lives under $SLUICE_CACHE (never in the repository);
# everything a running test bed writes lives under $SLUICE_STATE.
set -euo pipefail

SLUICE_CACHE=${SLUICE_CACHE:-$HOME/.cache/sluice}
SLUICE_STATE=${SLUICE_STATE:-$SLUICE_CACHE/state}
SLUICE_LOGS=${SLUICE_LOGS:-$SLUICE_STATE/logs}

KUBERNETES_VERSION=${KUBERNETES_VERSION:-v1.34.4}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
HELM_VERSION=${HELM_VERSION:-v3.22.0}
KAFKA_VERSION=${KAFKA_VERSION:-4.4.0}

K8S_BIN=$SLUICE_CACHE/kubernetes/$KUBERNETES_VERSION/bin
ETCD_BIN=$SLUICE_CACHE/etcd/$ETCD_VERSION/bin
HELM_BIN=$SLUICE_CACHE/helm/$HELM_VERSION/bin
KAFKA_HOME=$SLUICE_CACHE/kafka/$KAFKA_VERSION

# Network layout. The CNI bridge gateway is the address pods use to reach the host
# (the broker's pod listener binds there). The pod subnet is private to this machine:
# it exists only inside the bridge and the pods' network namespaces the node creates.
NODE_NAME=${NODE_NAME:-sluice-node}
POD_CIDR=${POD_CIDR:-10.88.0.0/16}
BRIDGE_NAME=${BRIDGE_NAME:-sluice0}
BRIDGE_GATEWAY=${BRIDGE_GATEWAY:-10.88.0.1}
SERVICE_CIDR=${SERVICE_CIDR:-10.96.0.0/16}
APISERVER_PORT=${APISERVER_PORT:-6443}
KAFKA_HOST_PORT=${KAFKA_HOST_PORT:-9092}
KAFKA_POD_PORT=${KAFKA_POD_PORT:-9094}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}

KUBECONFIG_PATH=$SLUICE_STATE/kubeconfig

log() { printf '[sluice-env] %s\n' "$*" >&2; }
die() { printf '[sluice-env] ERROR: %s\n' "$*" >&2; exit 1; }

# wait_for NAME LOGFILE TIMEOUT_SECONDS COMMAND...: retry COMMAND once a second until it
# succeeds; on timeout name the component and its log so the failure is actionable.
wait_for() {
  local name=$1 logfile=$2 timeout=$3; shift 3
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "$name did not become ready within ${timeout}s; last lines of $logfile:"
      tail -n 40 "$logfile" >&2 2>/dev/null || true
      die "$name not ready (log: $logfile)"
    fi
    sleep 1
  done
}

# A PID file holds the PID and the executable it must be running. A PID alone is not
# enough: after a reboot or a killed session the number may belong to another process,
# which must be neither trusted as "running" nor killed.
pid_alive() {
  local pidfile=$SLUICE_STATE/pids/$1.pid pid exe
  [[ -f $pidfile ]] || return 1
  { read -r pid; read -r exe; } <"$pidfile" || return 1
  [[ -n $pid && -n $exe ]] || return 1
  [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == "$exe" ]]
}

# start_daemon NAME COMMAND...: run COMMAND in the background, its output in
# $SLUICE_LOGS/NAME.log and its PID in $SLUICE_STATE/pids/NAME.pid. Idempotent: a
# component that is running is left alone.
start_daemon() {
  local name=$1; shift
  mkdir -p "$SLUICE_LOGS" "$SLUICE_STATE/pids"
  local pidfile=$SLUICE_STATE/pids/$name.pid exe
  if pid_alive "$name"; then
    log "$name already running (pid $(head -n1 "$pidfile"))"
    return 0
  fi
  exe=$(readlink -f "$(command -v "$1")") || die "cannot find $1 to start $name"
  log "starting $name (log: $SLUICE_LOGS/$name.log)"
  setsid "$@" >>"$SLUICE_LOGS/$name.log" 2>&1 </dev/null &
  printf '%s\n%s\n' "$!" "$exe" >"$pidfile"
}

# stop_daemon NAME: SIGTERM, wait up to 20 s, then SIGKILL.
stop_daemon() {
  local name=$1 pidfile=$SLUICE_STATE/pids/$1.pid pid
  [[ -f $pidfile ]] || return 0
  if pid_alive "$name"; then
    pid=$(head -n1 "$pidfile")
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do pid_alive "$name" || break; sleep 0.5; done
    pid_alive "$name" && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}


# ensure_bridge: the node's CNI bridge, created up front with the gateway address so the
# broker's pod listener can bind to it before the first pod exists. The CNI bridge plugin
# adopts an existing bridge of the configured name.
# SLUICE_EXTERNAL_BRIDGE=1: the gateway address already belongs to a bridge made by someone
# else (deploy/kind-e2e.sh: the kind network's Docker bridge), which is used as it is.
ensure_bridge() {
  [[ ${SLUICE_EXTERNAL_BRIDGE:-0} == 1 ]] && return 0
  if ! ip link show "$BRIDGE_NAME" >/dev/null 2>&1; then
    log "creating bridge $BRIDGE_NAME ($BRIDGE_GATEWAY/${POD_CIDR#*/})"
    ip link add "$BRIDGE_NAME" type bridge
  fi
  if ! ip -4 addr show dev "$BRIDGE_NAME" | grep -q "inet $BRIDGE_GATEWAY/"; then
    ip addr add "$BRIDGE_GATEWAY/${POD_CIDR#*/}" dev "$BRIDGE_NAME"
  fi
  ip link set "$BRIDGE_NAME" up
}

# port_open HOST PORT: true when something accepts TCP connections there.
# go_install_tool BIN_DIR MODULE/CMD@VERSION: `go install`s one command of a Go module into
# BIN_DIR (static, stripped) unless it is already there. Built into a temporary folder
# first, so an interrupted build never leaves a binary that the check would take for a
# finished one.
go_install_tool() {
  local bin=$1 pkg=$2 cmd tmp
  cmd=$(basename "${pkg%@*}")
  [[ -x $bin/$cmd ]] && return 0
  log "building $cmd from $pkg"
  mkdir -p "$bin"
  tmp=$(mktemp -d)
  CGO_ENABLED=0 GOBIN=$tmp go install -trimpath -ldflags "-s -w" "$pkg"
  mv "$tmp/$cmd" "$bin/$cmd"
  rmdir "$tmp"
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# The node's container runtime: a private containerd (own root, state and socket), so it
# never collides with a system containerd.
CONTAINERD_ROOT=/var/lib/sluice/containerd
CONTAINERD_STATE=/run/sluice/containerd
CONTAINERD_SOCK=$CONTAINERD_STATE/containerd.sock
PAUSE_IMAGE=registry.k8s.io/pause:3.10.1
ctr_k8s() { ctr --address "$CONTAINERD_SOCK" -n k8s.io "$@"; }
