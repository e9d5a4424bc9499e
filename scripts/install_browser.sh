#!/usr/bin/env bash
# Debian's headless Chromium for the web UI browser test (tests/test_webui.py); `make test` runs this.
# Quick and silent when chromium is already there. Where it cannot install (not root, no apt-get, no
# package mirror) it says so and exits 0: the test then skips with the reason, or fails under CI=true.
set -uo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: chromium is missing and needs root and apt-get to install" >&2
    exit 0
fi
echo "install_browser: installing Debian's chromium" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; then
    echo "install_browser: apt-get could not install chromium" >&2
fi
exit 0
