#!/usr/bin/env bash
# Tools from Debian's packages that pip cannot give, for the stack tests (DESIGN.md §6):
#   prometheus + promtool: unpacked into .tools/prometheus/ (no root needed, no service started)
#   docker-compose:        the offline validator of docker-compose.yml (apt-get install; needs root)
# Idempotent; prints what it could not install and exits 0 (the tests that need a tool say so themselves).
set -uo pipefail
cd "$(dirname "$0")/.."
TOOLS=.tools

apt_download() {  # apt_download PACKAGE DIR: the .deb into DIR, refreshing the package lists once if needed
    (cd "$2" && apt-get download -q "$1" >/dev/null 2>&1) && return 0
    [ "$(id -u)" = 0 ] && apt-get update -q >/dev/null 2>&1 && (cd "$2" && apt-get download -q "$1" >/dev/null 2>&1)
}

if command -v prometheus >/dev/null || [ -x "$TOOLS/prometheus/usr/bin/prometheus" ]; then
    :
elif command -v apt-get >/dev/null; then
    tmp=$(mktemp -d)
    if apt_download prometheus "$tmp"; then
        mkdir -p "$TOOLS/prometheus" && dpkg -x "$tmp"/prometheus_*.deb "$TOOLS/prometheus"
        echo "install-tools: prometheus $("$TOOLS/prometheus/usr/bin/prometheus" --version 2>&1 | head -1 | cut -d' ' -f3) in $TOOLS/prometheus"
    else
        echo "install-tools: could not download Debian's prometheus package; install Prometheus on PATH" >&2
    fi
    rm -rf "$tmp"
else
    echo "install-tools: no apt-get here; install Prometheus on PATH" >&2
fi

if ! command -v docker-compose >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends docker-compose >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends docker-compose >/dev/null 2>&1; } \
            || echo "install-tools: apt-get install docker-compose failed" >&2
        command -v docker-compose >/dev/null && echo "install-tools: $(docker-compose version --short) (Debian)"
    else
        echo "install-tools: docker-compose missing; as root: apt-get install docker-compose" >&2
    fi
fi
exit 0
