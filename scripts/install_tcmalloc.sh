#!/usr/bin/env bash
# Debian's tcmalloc, which the `medlava` command preloads (src/medlava/launch.py); `make setup` runs this.
# Quick and silent when it is already there. Where it cannot install (not root, no apt-get, no
# package mirror) it says so and exits 0: medlava then runs on glibc's malloc, a little slower.
set -uo pipefail
ldconfig -p 2>/dev/null | grep -q libtcmalloc && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_tcmalloc: libtcmalloc-minimal4 is missing and needs root and apt-get to install" >&2
    exit 0
fi
echo "install_tcmalloc: installing Debian's libtcmalloc-minimal4" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4 >/dev/null; }; then
    echo "install_tcmalloc: apt-get could not install libtcmalloc-minimal4" >&2
fi
exit 0
