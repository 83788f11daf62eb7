#!/usr/bin/env bash
# Renders an HTML page with headless Chromium (Debian's package, installed if missing) and
# checks the screenshot is not blank. Used by `make demo` for its report.
#   render-check.sh <page.html> [<screenshot.png>]
source "$(dirname "$0")/lib.sh"
page=${1:?usage: render-check.sh <page.html> [<screenshot.png>]}
shot=${2:-${page%.html}.png}
[[ -s $page ]] || die "$page does not exist or is empty"
if ! command -v chromium >/dev/null; then
  [[ $(id -u) == 0 ]] || die "chromium is missing; run as root to install it (apt)"
  log "installing chromium (apt) to check the demo report renders"
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
    --no-install-recommends chromium >/dev/null
fi
rm -f "$shot"
# --no-sandbox: the check runs as root; the page is our own file and loads nothing else.
timeout 120 chromium --headless --no-sandbox --disable-gpu --hide-scrollbars \
  --window-size=1000,1100 --screenshot="$shot" "file://$(realpath "$page")" >/dev/null 2>&1 || true
[[ -s $shot ]] || die "chromium wrote no screenshot of $page"
# A blank 1000x1100 page compresses to a few KiB; the report (two charts, tables) to tens.
size=$(stat -c %s "$shot")
((size > 20000)) || die "the screenshot of $page is nearly empty ($size bytes): the page did not render"
echo "$shot"
