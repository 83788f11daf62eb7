#!/usr/bin/env bash
# Pushes the images `make images` built (OCI image archives under $SLUICE_CACHE/images) to a
# registry with crane (build-crane.sh):
#
#   push.sh REGISTRY [TAG] [NAME ...]     e.g. push.sh 127.0.0.1:5005/sluice dev
#
# REGISTRY is host[:port][/path]; each image sluice.dev/NAME:TAG becomes REGISTRY/NAME:TAG.
# NAMEs default to every Sluice image. Registries on localhost/127.0.0.1 are spoken to over
# plain HTTP, every other one over HTTPS with the credentials of ~/.docker/config.json
# (`crane auth login`).
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
[[ $# -ge 1 && -n $1 ]] || die "usage: push.sh REGISTRY [TAG] [NAME ...] (REGISTRY: host[:port][/path])"
registry=${1%/} tag=${2:-dev}
shift $(($# >= 2 ? 2 : 1))
names=("$@")
((${#names[@]})) || names=(operator consumer inventory testapp testbed-probe)
crane=$(bash "$here/build-crane.sh")
for name in "${names[@]}"; do
  archive=$SLUICE_CACHE/images/sluice.dev_${name}_${tag}.tar
  [[ -f $archive ]] || die "no image archive $archive: run \`make images IMAGE_TAG=$tag\` first"
  layout=$(mktemp -d)
  tar -xf "$archive" -C "$layout"
  "$crane" push "$layout" "$registry/$name:$tag" >/dev/null
  digest=$("$crane" digest "$registry/$name:$tag")
  rm -rf "$layout"
  log "pushed $registry/$name:$tag@$digest"
  echo "$registry/$name:$tag@$digest"
done
