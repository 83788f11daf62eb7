#!/usr/bin/env bash
# Creates the test bed's certificates and kubeconfigs under $SLUICE_STATE/pki (once):
# a CA, the API server's serving certificate, the service-account signing keys, and a
# client certificate + kubeconfig per component (each with its own RBAC identity).
source "$(dirname "$0")/lib.sh"
PKI=$SLUICE_STATE/pki
mkdir -p "$PKI"
cd "$PKI"
[[ -f .complete ]] && exit 0

openssl_quiet() { openssl "$@" 2>/dev/null; }

log "creating test-bed PKI in $PKI"
openssl_quiet req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
  -subj "/CN=sluice-testbed-ca"

# sign NAME SUBJECT [SAN]: a key and a certificate signed by the CA.
sign() {
  local name=$1 subject=$2 san=${3:-} ext
  openssl_quiet req -newkey rsa:2048 -nodes -keyout "$name.key" -out "$name.csr" -subj "$subject"
  ext=$(mktemp)
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    if [[ -n $san ]]; then
      echo "extendedKeyUsage=serverAuth,clientAuth"
      echo "subjectAltName=$san"
    else
      echo "extendedKeyUsage=clientAuth"
    fi
  } >"$ext"
  openssl_quiet x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out "$name.crt" -days 3650 -extfile "$ext"
  rm -f "$name.csr" "$ext"
}

# the first address of the service range is the `kubernetes` Service
kubeservice_ip=${SERVICE_CIDR%%/*}; kubeservice_ip=${kubeservice_ip%.*}.1
sign apiserver "/CN=kube-apiserver" \
  "IP:127.0.0.1,IP:$BRIDGE_GATEWAY,IP:$kubeservice_ip,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
sign kubelet-serving "/CN=$NODE_NAME" "IP:127.0.0.1,IP:$BRIDGE_GATEWAY,DNS:$NODE_NAME"
sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
sign admin "/O=system:masters/CN=sluice-testbed-admin"
sign controller-manager "/CN=system:kube-controller-manager"
sign scheduler "/CN=system:kube-scheduler"
sign kubelet "/O=system:nodes/CN=system:node:$NODE_NAME"
sign kube-proxy "/CN=system:kube-proxy"

openssl_quiet genrsa -out sa.key 2048
openssl_quiet rsa -in sa.key -pubout -out sa.pub

# kubeconfig NAME: a kubeconfig for the client certificate NAME.crt.
kubeconfig() {
  local name=$1
  cat >"$name.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: sluice-testbed
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 ca.crt)
users:
- name: $name
  user:
    client-certificate-data: $(base64 -w0 "$name.crt")
    client-key-data: $(base64 -w0 "$name.key")
contexts:
- name: sluice-testbed
  context: {cluster: sluice-testbed, user: $name}
current-context: sluice-testbed
KC
}
for c in admin controller-manager scheduler kubelet kube-proxy; do kubeconfig "$c"; done
cp admin.kubeconfig "$KUBECONFIG_PATH"
touch .complete
