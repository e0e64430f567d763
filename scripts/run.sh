#!/usr/bin/env bash
# The main job: installs what is missing, builds, starts NATS and the services as separate
# processes on embedded defaults (SQLite under data/), waits until each is ready, shows the
# mesh working, then keeps running until Ctrl-C and shuts everything down cleanly.
# MILLRACE_DEMO_EXIT=1 exits after the demonstration instead of waiting.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

PROFILE=${MILLRACE_PROFILE:-debug}
if [ "$PROFILE" = release ]; then cargo build --release --bins; else cargo build --bins; fi
BIN=target/$PROFILE

DATA=${MILLRACE_DATA_DIR:-data}
LOGS=$DATA/logs
mkdir -p "$LOGS" "$DATA/nats"
NATS_PORT=${MILLRACE_NATS_PORT:-4222}
export MILLRACE_NATS_URL=nats://127.0.0.1:$NATS_PORT
export MILLRACE_DATABASE_URL=${MILLRACE_DATABASE_URL:-sqlite://$DATA/sink.db}
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

bold "starting NATS and the services"
start nats .tools/venv/bin/nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -m 8222 -sd "$DATA/nats"
wait_ready nats "http://127.0.0.1:8222/healthz?js-enabled-only=true"
# Services run as deployed: one process each, ordered only by readiness.
start sink "$BIN/sink"
start inference "$BIN/inference"
start ingest "$BIN/ingest"
wait_ready sink http://127.0.0.1:9187/readyz
wait_ready inference http://127.0.0.1:9185/readyz
wait_ready ingest http://127.0.0.1:9180/readyz

show() { # method url [json body] [extra curl args...]
    local method=$1 url=$2 body=${3:-}; shift 3 2>/dev/null || shift $#
    printf '\n$ curl -X %s %s %s\n' "$method" "$url" "${body:+-d '$body'}"
    if [ -n "$body" ]; then
        curl -sS -X "$method" "$url" -H 'content-type: application/json' "$@" -d "$body" -w '\n  → HTTP %{http_code}\n'
    else
        curl -sS -X "$method" "$url" "$@" -w '\n  → HTTP %{http_code}\n'
    fi
}
id_of() { sed -n 's/.*"request_id":"\([^"]*\)".*/\1/p'; }

bold "1. queries are accepted (202 + request id) and wait, durably, in MR_QUERIES"
q1=$(curl -sS -X POST $INGEST/v1/queries -H 'content-type: application/json' \
    -d '{"user":"ada","session":"s1","text":"What is the capital of France?"}' | id_of)
echo "accepted $q1"
q2=$(curl -sS -X POST $INGEST/v1/queries -H 'content-type: application/json' \
    -d '{"user":"ada","session":"s1","text":"And of Italy?","params":{"max_new_tokens":16}}' | id_of)
echo "accepted $q2"

bold "2. a retried submit with the same Idempotency-Key is the same request"
show POST $INGEST/v1/queries '{"user":"bob","text":"Hello"}' -H 'Idempotency-Key: demo-key-1'
show POST $INGEST/v1/queries '{"user":"bob","text":"Hello"}' -H 'Idempotency-Key: demo-key-1'

bold "3. bad input gets a specific error and nothing else is touched"
show POST $INGEST/v1/queries '{"user":"ada","text":"   "}'
show POST $INGEST/v1/queries '{"user":"ada","text":"hi","model":"gpt-9"}'
show POST $INGEST/v1/queries '{"user":"ada","text":'

bold "4. a client cancels a request: its terminal CANCELLED row lands in the sink"
show DELETE "$INGEST/v1/queries/$q2"
sleep 0.5
show GET "$INGEST/v1/queries/$q2"

bold "5. the other request waits for the middle of the mesh (preprocess, moderation, session, batcher: later issues)"
show GET "$INGEST/v1/queries/$q1"
echo "stream depths (monitoring endpoint /jsz):"
curl -sS 'http://127.0.0.1:8222/jsz?streams=true' | python3 -c "$(cat <<'PY'
import json, sys
for account in json.load(sys.stdin).get("account_details", []):
    for stream in account.get("stream_detail", []):
        print(f"  {stream['name']:<16} {stream['state']['messages']:>4} messages")
PY
)"

bold "6. rows in the sink (GET $SINK/v1/results)"
curl -sS "$SINK/v1/results?page_size=20" | python3 -c "$(cat <<'PY'
import json, sys
rows = json.load(sys.stdin)["results"]
print(f"  {'request_id':<38} {'status':<14} {'reason':<22} stage")
for r in rows:
    print(f"  {r['request_id']:<38} {r['status']:<14} {r['reason']:<22} {r['stage']}")
print(f"  ({len(rows)} rows)")
PY
)"

bold "Millrace is running"
cat <<INFO
  ingest   HTTP $INGEST/v1/queries   gRPC 127.0.0.1:50051 (millrace.v1.Ingest)
  sink     HTTP $SINK/v1/results     gRPC 127.0.0.1:50057 (millrace.v1.Results)
  infer.   gRPC 127.0.0.1:50055 (millrace.v1.Inference: Generate, Embed, Classify)
  metrics  http://127.0.0.1:9180/metrics (ingest)  :9185 (inference)  :9187 (sink)
  NATS     $MILLRACE_NATS_URL  monitoring http://127.0.0.1:8222
  data     $DATA/ (SQLite, JetStream store, logs)
INFO
if [ "${MILLRACE_DEMO_EXIT:-0}" = 1 ]; then exit 0; fi
echo "Ctrl-C stops everything."
while true; do sleep 3600 & wait $!; done
