#!/usr/bin/env bash
# Starts a throw-away PostgreSQL server for the tests (Debian's postgresql package, installed
# when missing) and prints its URL; `scripts/postgres.sh stop DIR` stops it.
# Usage: eval "$(scripts/postgres.sh start)"  → sets MILLRACE_TEST_POSTGRES_URL and PG_TEST_DIR
set -euo pipefail

find_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }

case "${1:-start}" in
start)
    bin=$(find_bin)
    if [ -z "$bin" ] || [ ! -x "$bin/postgres" ]; then
        echo "[postgres] installing Debian's postgresql" >&2
        if [ "$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi
        $SUDO apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
        bin=$(find_bin)
    fi
    dir=$(mktemp -d /tmp/millrace-pg.XXXXXX)
    chmod 755 "$dir"
    # initdb refuses to run as root: run the server as the postgres user when we are root.
    if [ "$(id -u)" -eq 0 ]; then
        id postgres >/dev/null 2>&1 || useradd --system postgres
        chown postgres "$dir"
        as_pg() { runuser -u postgres -- "$@"; }
    else
        as_pg() { "$@"; }
    fi
    as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    # A port picked free may be taken before the server binds it: on that, pick another.
    for attempt in 1 2 3 4 5; do
        port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
        if as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
            -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null; then
            break
        fi
        if [ "$attempt" -eq 5 ] || ! grep -q "could not bind\|already in use" "$dir/server.log"; then
            cat "$dir/server.log" >&2
            exit 1
        fi
        echo "[postgres] port $port was taken; trying another" >&2
    done
    echo "export MILLRACE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$port/postgres"
    echo "export PG_TEST_DIR=$dir"
    ;;
stop)
    dir=$2
    bin=$(find_bin)
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
    else
        "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
    ;;
esac
