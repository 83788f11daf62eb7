#!/usr/bin/env bash
# The test bed's production-shaped Kafka: three KRaft nodes (each broker + controller), RF 3,
# min.insync.replicas=2, with SASL_SSL (SCRAM-SHA-512) and SSL (client certificates)
# listeners signed by the test bed's own Kafka CA. It runs BESIDE the fast single broker of
# kafka.sh (which the bulk of the suite uses); tests that need replication, leader movement
# or authentication use this one.
#
#   kafka-cluster.sh up            certificates (once), format storage (once), start, wait
#   kafka-cluster.sh stop          stop the three nodes, keep their data
#   kafka-cluster.sh down          stop and delete the data (certificates stay)
#   kafka-cluster.sh env           the KEY=VALUE lines for the test bed's env file
#   kafka-cluster.sh stop-node N   SIGTERM node N (1..3) and wait until it exited
#   kafka-cluster.sh kill-node N   SIGKILL node N
#   kafka-cluster.sh start-node N  start node N again (same data) and wait until it is back:
#                                  unfenced and accepting SCRAM logins
#   kafka-cluster.sh scram-set USER PASSWORD   add or replace USER's SCRAM-SHA-512 credential
#   kafka-cluster.sh scram-delete USER         remove USER's SCRAM-SHA-512 credential
#   kafka-cluster.sh usage [SECONDS]           CPU (% of one core) and RSS of each node (and
#                                              of kafka.sh's broker) over SECONDS (default 30)
#
# Node N (1..3) listens on (each listener advertises its own address):
#   PLAIN        127.0.0.1:1910N          PLAINTEXT: the fixtures' admin, inter-broker traffic
#   SCRAM        127.0.0.1:1911N          SASL_SSL SCRAM-SHA-512, for clients on the host
#   MTLS         127.0.0.1:1912N          SSL with a required client certificate, host
#   CONTROLLER   127.0.0.1:1913N          KRaft quorum (3 voters)
#   POD_SCRAM    $BRIDGE_GATEWAY:1915N    SASL_SSL SCRAM-SHA-512, for pods
#   POD_MTLS     $BRIDGE_GATEWAY:1916N    SSL with a required client certificate, for pods
# The ports can be moved with KAFKA_CLUSTER_PORT_BASE (default 19100).
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)

KAFKA_LIBS=$KAFKA_HOME/libs
CLUSTER_STATE=$SLUICE_STATE/kafka-cluster
# Certificates live outside the runtime state (like pki.sh's): `down` keeps them.
CLUSTER_PKI=$SLUICE_STATE/kafka-pki
BASE=${KAFKA_CLUSTER_PORT_BASE:-19100}
NODES=(1 2 3)
# The SCRAM users created at format time (user=password). The tests own these names; tests
# that change credentials create their own users with scram-set.
SCRAM_USERS=(sluice-scram=scram-secret-1 strimzi-scram=strimzi-secret-1)
# Client certificates (CN) signed by the CA, for the mTLS listener.
TLS_USERS=(sluice-mtls strimzi-mtls)
# A small heap per node: three nodes share a 2-core machine with the single broker, the
# control plane and the node. Serial GC: no parallel GC threads fighting for two cores.
CLUSTER_JAVA_OPTS=${KAFKA_CLUSTER_JAVA_OPTS:--Xms192m -Xmx384m -XX:+UseSerialGC -XX:CICompilerCount=2}

port() { echo $((BASE + $1 * 10 + $2)); } # port LISTENER_INDEX NODE
plain_port() { port 0 "$1"; }
scram_port() { port 1 "$1"; }
mtls_port() { port 2 "$1"; }
controller_port() { port 3 "$1"; }
pod_scram_port() { port 5 "$1"; }
pod_mtls_port() { port 6 "$1"; }
bootstrap() { # bootstrap HOST PORT_FN
  local out=() n
  for n in "${NODES[@]}"; do out+=("$1:$("$2" "$n")"); done
  (IFS=,; echo "${out[*]}")
}

pki() {
  [[ -f $CLUSTER_PKI/.complete ]] && return 0
  mkdir -p "$CLUSTER_PKI"
  (
    cd "$CLUSTER_PKI"
    log "creating the Kafka cluster's CA and certificates in $CLUSTER_PKI"
    q() { openssl "$@" 2>/dev/null; }
    q req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj "/O=sluice-testbed/CN=sluice-kafka-ca"
    # sign NAME SUBJECT EXTENDED_KEY_USAGE [SAN]
    sign() {
      local ext
      ext=$(mktemp)
      printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=%s\n' "$3" >"$ext"
      [[ -n ${4:-} ]] && echo "subjectAltName=$4" >>"$ext"
      q req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2"
      q x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" \
        -days 3650 -extfile "$ext"
      rm -f "$1.csr" "$ext"
    }
    for n in "${NODES[@]}"; do
      sign "broker-$n" "/O=sluice-testbed/CN=kafka-$n" serverAuth,clientAuth \
        "IP:127.0.0.1,IP:$BRIDGE_GATEWAY,DNS:localhost"
      # The broker's keystore (PKCS#12); the password is only a file-format formality.
      q pkcs12 -export -in "broker-$n.crt" -inkey "broker-$n.key" -certfile ca.crt \
        -name "kafka-$n" -out "broker-$n.p12" -passout pass:testbed
    done
    for u in "${TLS_USERS[@]}"; do
      sign "$u" "/CN=$u" clientAuth
      # What Strimzi's User Operator also ships: the same key pair as PKCS#12 + its password.
      openssl rand -hex 12 | tr -d '\n' >"$u.password"
      q pkcs12 -export -in "$u.crt" -inkey "$u.key" -certfile ca.crt -name "$u" \
        -out "$u.p12" -passout "file:$u.password"
    done
    chmod 600 ./*.key ./*.p12 ./*.password
    touch .complete
  )
}

write_config() { # write_config NODE
  local n=$1 voters=() m dir=$CLUSTER_STATE/node-$1
  for m in "${NODES[@]}"; do voters+=("$m@127.0.0.1:$(controller_port "$m")"); done
  mkdir -p "$dir/data"
  cat >"$dir/server.properties" <<PROPS
# Generated by tests/env/kafka-cluster.sh — node $n of the three-node secured test cluster.
# Combined roles: each JVM is a broker and a KRaft controller (3 voters), so the quorum and
# the partition leaders move together when a node stops, on 3 JVMs instead of 6.
process.roles=broker,controller
node.id=$n
controller.quorum.voters=$(IFS=,; echo "${voters[*]}")
controller.listener.names=CONTROLLER
listeners=PLAIN://127.0.0.1:$(plain_port "$n"),SCRAM://127.0.0.1:$(scram_port "$n"),MTLS://127.0.0.1:$(mtls_port "$n"),POD_SCRAM://$BRIDGE_GATEWAY:$(pod_scram_port "$n"),POD_MTLS://$BRIDGE_GATEWAY:$(pod_mtls_port "$n"),CONTROLLER://127.0.0.1:$(controller_port "$n")
advertised.listeners=PLAIN://127.0.0.1:$(plain_port "$n"),SCRAM://127.0.0.1:$(scram_port "$n"),MTLS://127.0.0.1:$(mtls_port "$n"),POD_SCRAM://$BRIDGE_GATEWAY:$(pod_scram_port "$n"),POD_MTLS://$BRIDGE_GATEWAY:$(pod_mtls_port "$n")
listener.security.protocol.map=PLAIN:PLAINTEXT,SCRAM:SASL_SSL,MTLS:SSL,POD_SCRAM:SASL_SSL,POD_MTLS:SSL,CONTROLLER:PLAINTEXT
# Replication and the quorum stay on loopback plaintext: the CPU goes to the clients' TLS.
inter.broker.listener.name=PLAIN
log.dirs=$dir/data

# TLS for every SSL/SASL_SSL listener: the broker's key pair, the test bed's Kafka CA.
ssl.keystore.type=PKCS12
ssl.keystore.location=$CLUSTER_PKI/broker-$n.p12
ssl.keystore.password=testbed
ssl.key.password=testbed
ssl.truststore.type=PEM
ssl.truststore.location=$CLUSTER_PKI/ca.crt
ssl.endpoint.identification.algorithm=https
listener.name.mtls.ssl.client.auth=required
listener.name.pod_mtls.ssl.client.auth=required
# SCRAM-SHA-512 only (what Strimzi's scram-sha-512 authentication offers).
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.scram.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.scram.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.pod_scram.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.pod_scram.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;

# Replicated like production: RF 3, two in sync to accept a write (acks=all), internal
# topics included, and no unclean leader election.
default.replication.factor=3
min.insync.replicas=2
offsets.topic.replication.factor=3
offsets.topic.num.partitions=12
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
unclean.leader.election.enable=false
num.partitions=3
auto.create.topics.enable=false

# Sized for two shared cores: few threads per node.
num.network.threads=2
num.io.threads=2
num.replica.fetchers=1
background.threads=2
log.cleaner.threads=1
num.recovery.threads.per.data.dir=1

# As kafka.sh: quick classic rebalances, short session floors for KIP-848 groups.
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
group.consumer.session.timeout.ms=10000
group.consumer.min.session.timeout.ms=2000
group.consumer.heartbeat.interval.ms=1000
group.consumer.min.heartbeat.interval.ms=500
PROPS
}

format() { # format NODE CLUSTER_ID
  local n=$1 dir=$CLUSTER_STATE/node-$1 scram=() u
  [[ -f $dir/data/meta.properties ]] && return 0
  for u in "${SCRAM_USERS[@]}"; do
    scram+=(--add-scram "SCRAM-SHA-512=[name=${u%%=*},password=${u#*=}]")
  done
  java -Dlog4j2.configurationFile="$here/kafka/log4j2.yaml" -cp "$KAFKA_LIBS/*" \
    kafka.tools.StorageTool format -t "$2" -c "$dir/server.properties" "${scram[@]}" \
    >>"$SLUICE_LOGS/kafka-cluster-$n.log" 2>&1 \
    || die "formatting node $n failed (log: $SLUICE_LOGS/kafka-cluster-$n.log)"
}

start_node() {
  local n=$1
  start_daemon "kafka-cluster-$n" java $CLUSTER_JAVA_OPTS -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$here/kafka/log4j2.yaml" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$CLUSTER_STATE/node-$n/server.properties"
}

wait_node() {
  local n=$1 log=$SLUICE_LOGS/kafka-cluster-$1.log
  wait_for "kafka-cluster node $n" "$log" 180 port_open 127.0.0.1 "$(plain_port "$n")"
  wait_for "kafka-cluster node $n" "$log" 60 port_open "$BRIDGE_GATEWAY" "$(pod_mtls_port "$n")"
}

# A restarted node is back in service: registered and unfenced (metadata caught up), and
# accepting the test bed's SCRAM users on its own listener (see kafka/NodeBack.java for the
# Kafka 4.4 defect it works around). Open ports alone say neither, and the partitions' ISR
# may never have shrunk while it was down.
node_back() {
  local n=$1 log=$SLUICE_LOGS/kafka-cluster-$1.log
  java -Dorg.apache.logging.log4j.level=OFF -cp "$KAFKA_LIBS/*" "$here/kafka/NodeBack.java" "$(bootstrap 127.0.0.1 plain_port)" "$n" \
    "127.0.0.1:$(scram_port "$n")" "$CLUSTER_PKI/ca.crt" 180 "${SCRAM_USERS[@]}" \
    || { tail -n 40 "$log" >&2; die "node $n did not come back (log: $log)"; }
}

# Every node registered and the cluster answering on its plaintext listener.
cluster_ready() {
  java -cp "$KAFKA_LIBS/*" "$here/kafka/BrokerInfo.java" "$(bootstrap 127.0.0.1 plain_port)" \
    --expect-brokers 3
}

up() {
  bash "$here/kafka.sh" fetch
  ensure_bridge
  pki
  mkdir -p "$SLUICE_LOGS" "$CLUSTER_STATE"
  [[ -f $CLUSTER_STATE/cluster.id ]] \
    || java -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool random-uuid >"$CLUSTER_STATE/cluster.id"
  local n id
  id=$(cat "$CLUSTER_STATE/cluster.id")
  for n in "${NODES[@]}"; do
    write_config "$n"
    format "$n" "$id"
  done
  for n in "${NODES[@]}"; do start_node "$n"; done
  for n in "${NODES[@]}"; do wait_node "$n"; done
  wait_for kafka-cluster "$SLUICE_LOGS/kafka-cluster-1.log" 120 cluster_ready
  log "kafka-cluster ready: PLAINTEXT $(bootstrap 127.0.0.1 plain_port), SCRAM $(bootstrap 127.0.0.1 scram_port), mTLS $(bootstrap 127.0.0.1 mtls_port); pods: SCRAM $(bootstrap "$BRIDGE_GATEWAY" pod_scram_port), mTLS $(bootstrap "$BRIDGE_GATEWAY" pod_mtls_port)"
}

env_lines() {
  cat <<ENV
SLUICE_KAFKA_CLUSTER_BOOTSTRAP=$(bootstrap 127.0.0.1 plain_port)
SLUICE_KAFKA_CLUSTER_SCRAM_BOOTSTRAP=$(bootstrap 127.0.0.1 scram_port)
SLUICE_KAFKA_CLUSTER_MTLS_BOOTSTRAP=$(bootstrap 127.0.0.1 mtls_port)
SLUICE_KAFKA_CLUSTER_POD_SCRAM_BOOTSTRAP=$(bootstrap "$BRIDGE_GATEWAY" pod_scram_port)
SLUICE_KAFKA_CLUSTER_POD_MTLS_BOOTSTRAP=$(bootstrap "$BRIDGE_GATEWAY" pod_mtls_port)
SLUICE_KAFKA_CLUSTER_PKI=$CLUSTER_PKI
SLUICE_KAFKA_CLUSTER_CTL="$here/kafka-cluster.sh"
ENV
}

node_arg() {
  [[ ${1:-} =~ ^[123]$ ]] || die "expected a node number 1, 2 or 3, got '${1:-}'"
}

scram() { # scram set|delete USER [PASSWORD]
  java -cp "$KAFKA_LIBS/*" "$here/kafka/ScramUser.java" "$(bootstrap 127.0.0.1 plain_port)" "$@"
}

case ${1:-up} in
  up) up ;;
  stop) for n in "${NODES[@]}"; do stop_daemon "kafka-cluster-$n"; done ;;
  down)
    for n in "${NODES[@]}"; do stop_daemon "kafka-cluster-$n"; done
    rm -rf "$CLUSTER_STATE"
    ;;
  env) env_lines ;;
  stop-node)
    # A controlled shutdown (leaderships handed over first) may take a while on a busy
    # machine; unlike stop_daemon this never escalates to SIGKILL, it fails instead.
    node_arg "${2:-}"
    if pid_alive "kafka-cluster-$2"; then
      kill -TERM "$(head -n1 "$SLUICE_STATE/pids/kafka-cluster-$2.pid")"
      for _ in $(seq 1 600); do pid_alive "kafka-cluster-$2" || break; sleep 0.2; done
      pid_alive "kafka-cluster-$2" && die "node $2 did not shut down within 120 s of SIGTERM"
    fi
    rm -f "$SLUICE_STATE/pids/kafka-cluster-$2.pid"
    ;;
  kill-node)
    node_arg "${2:-}"
    if pid_alive "kafka-cluster-$2"; then
      kill -KILL "$(head -n1 "$SLUICE_STATE/pids/kafka-cluster-$2.pid")"
      while pid_alive "kafka-cluster-$2"; do sleep 0.2; done
    fi
    rm -f "$SLUICE_STATE/pids/kafka-cluster-$2.pid"
    ;;
  start-node) node_arg "${2:-}"; start_node "$2"; wait_node "$2"; node_back "$2" ;;
  scram-set) [[ $# == 3 ]] || die "usage: kafka-cluster.sh scram-set USER PASSWORD"; scram set "$2" "$3" ;;
  usage) usage "${2:-30}" ;;
  scram-delete) [[ $# == 2 ]] || die "usage: kafka-cluster.sh scram-delete USER"; scram delete "$2" ;;
  *) die "usage: kafka-cluster.sh up|stop|down|env|stop-node N|kill-node N|start-node N|scram-set USER PASSWORD|scram-delete USER" ;;
esac
