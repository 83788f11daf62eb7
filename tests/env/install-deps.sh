#!/usr/bin/env bash
# Installs what the test bed and the build need from Debian (idempotent: only what is
# missing). Go, a JDK 17 with Maven, and Rust (cargo, clippy, rustfmt) are prerequisites.
source "$(dirname "$0")/lib.sh"
for tool in go java mvn cargo; do
  command -v "$tool" >/dev/null || die "$tool is required (see README: prerequisites)"
done
need=()
for pkg in containerd runc containernetworking-plugins iptables conntrack gcc libc6-dev \
  make cmake g++ openssl curl ca-certificates iproute2 util-linux python3 shellcheck; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
  [[ $(id -u) == 0 ]] || die "missing Debian packages ${need[*]}; run as root to install them"
  log "installing ${need[*]} (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
