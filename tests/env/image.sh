#!/usr/bin/env bash
# Turns a binary into an OCI image and imports it into the node's containerd — no Docker.
#
#   image.sh NAME:TAG BINARY [--arg ARG ...]
#
# The image holds the binary at /usr/local/bin/<name>, the shared libraries it links
# (resolved with ldd), /etc/passwd with the non-root user 65532 and /tmp. Use it in pods
# with `imagePullPolicy: Never` or `IfNotPresent` and the fixed tag.
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
[[ $# -ge 2 ]] || die "usage: image.sh NAME:TAG BINARY [--arg ARG ...]"
ref=$1 bin=$2; shift 2
[[ -x $bin ]] || die "image.sh: $bin is not an executable file"
dest=/usr/local/bin/$(basename "$bin")
out=$SLUICE_CACHE/images/$(echo "$ref" | tr '/:' '__').tar
python3 "$here/image/oci-image.py" --name "$ref" --out "$out" --with-libs \
  --entrypoint "$dest" "$@" "$bin:$dest" >/dev/null
# Without a running test bed (a machine that only builds and pushes: `make push`) the
# archive is the result.
if [[ -S $CONTAINERD_SOCK ]]; then
  ctr_k8s images import "$out" >/dev/null
  log "imported $ref ($out)"
else
  log "wrote $ref as $out (the test bed's node is not running: not imported)"
fi
