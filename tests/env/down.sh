#!/usr/bin/env bash
# Stops the test bed and removes its runtime state (broker data, etcd, the env file);
# cached builds, certificates and imported images stay. The next `up.sh` starts a clean
# cluster and an empty broker.
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
bash "$here/registry.sh" down
bash "$here/node.sh" down
bash "$here/control-plane.sh" down
bash "$here/kafka.sh" down
bash "$here/kafka-cluster.sh" down
rm -rf "$SLUICE_STATE/etcd" "$SLUICE_STATE/node" "$SLUICE_STATE/env"
log "test bed stopped; logs kept in $SLUICE_LOGS"
