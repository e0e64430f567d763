# Shared by scripts/run.sh and scripts/bench-mesh.sh (sourced, not run): builds the services
# and starts NATS and the seven services as separate processes, each configured by its
# MILLRACE_* environment, waits until every one is ready, and stops them all cleanly on exit
# (services drain first, NATS last).
#
# In: MILLRACE_PROFILE (debug|release), MILLRACE_NATS_PORT (4222); MILLRACE_DATA_DIR (data)
# when start_mesh runs. Out: BIN, INGEST, SINK, MILLRACE_NATS_URL; functions bold, start_mesh
# (sets DATA, LOGS), stop_all.

PROFILE=${MILLRACE_PROFILE:-debug}
if [ "$PROFILE" = release ]; then cargo build --release --bins; else cargo build --bins; fi
BIN=target/$PROFILE

NATS_PORT=${MILLRACE_NATS_PORT:-4222}
export MILLRACE_NATS_URL=nats://127.0.0.1:$NATS_PORT
INGEST=http://127.0.0.1:8080
SINK=http://127.0.0.1:8090

bold() { printf '\n\033[1m%s\033[0m\n' "$*"; }

pids=()
stop_all() {
    bold "shutting down"
    # Services drain first (they still need NATS to ack and flush), NATS last.
    local services=("${pids[@]:1}")
    for pid in "${services[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${services[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ ${#pids[@]} -gt 0 ]; then kill -TERM "${pids[0]}" 2>/dev/null || true; wait "${pids[0]}" 2>/dev/null || true; fi
    pids=()
    echo "all processes stopped"
}
trap stop_all EXIT

start() { # name, then the command
    local name=$1; shift
    "$@" >"$LOGS/$name.log" 2>&1 &
    pids+=($!)
    echo "started $name (pid $!, log $LOGS/$name.log)"
}

wait_ready() { # name url
    for _ in $(seq 1 300); do
        if curl -fsS -o /dev/null "$2" 2>/dev/null; then echo "$1 ready"; return 0; fi
        sleep 0.1
    done
    echo "$1 did not become ready; its log:" >&2
    tail -50 "$LOGS/$1.log" >&2
    exit 1
}

start_mesh() {
    DATA=${MILLRACE_DATA_DIR:-data}
    LOGS=$DATA/logs
    mkdir -p "$LOGS" "$DATA/nats"
    export MILLRACE_DATABASE_URL=${MILLRACE_DATABASE_URL:-sqlite://$DATA/sink.db}
    bold "starting NATS and the services"
    start nats .tools/venv/bin/nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -m 8222 -sd "$DATA/nats"
    wait_ready nats "http://127.0.0.1:8222/healthz?js-enabled-only=true"
    # Services run as deployed: one process each, ordered only by readiness.
    for service in sink inference batcher session moderation preprocess ingest; do
        start "$service" "$BIN/$service"
    done
    for pair in sink:9187 inference:9185 batcher:9184 session:9183 moderation:9182 preprocess:9181 ingest:9180; do
        wait_ready "${pair%%:*}" "http://127.0.0.1:${pair##*:}/readyz"
    done
}
