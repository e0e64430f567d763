#!/usr/bin/env bash
# Runs promtool with the given arguments: the one on PATH, else the one from Debian's
# `prometheus` package unpacked under .tools/prometheus (fetched with `apt-get download` on first
# use; the Prometheus service is never installed). Prints nothing of its own on success.
#
#     scripts/promtool.sh check rules deploy/prometheus/alerts.yml
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=.tools
UNPACKED=$TOOLS/prometheus
LOCAL=$UNPACKED/usr/bin/promtool

if command -v promtool >/dev/null; then
    exec promtool "$@"
fi

if [ ! -x "$LOCAL" ]; then
    say() { printf '\033[1m[promtool]\033[0m %s\n' "$*" >&2; }
    as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
    command -v apt-get >/dev/null || { echo "promtool is not on PATH and apt-get is missing: install Prometheus' promtool" >&2; exit 1; }
    cache=$TOOLS/cache/apt
    mkdir -p "$cache"
    if ! ls "$cache"/prometheus_*.deb >/dev/null 2>&1; then
        say "fetching Debian's prometheus package for promtool (not installing the service)"
        # apt-get download needs the package lists; a fresh machine may have none yet.
        if ! (cd "$cache" && apt-get download -q prometheus >/dev/null 2>&1); then
            as_root apt-get update -qq
            (cd "$cache" && apt-get download -q prometheus >/dev/null)
        fi
    fi
    deb=$(ls -t "$cache"/prometheus_*.deb | head -1)
    rm -rf "$UNPACKED"
    dpkg -x "$deb" "$UNPACKED"
    [ -x "$LOCAL" ] || { echo "$deb holds no usr/bin/promtool" >&2; exit 1; }
    say "$("$LOCAL" --version 2>&1 | head -1) in $UNPACKED"
fi
exec "$LOCAL" "$@"
