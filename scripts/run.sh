#!/usr/bin/env bash
# The main job: installs what is missing, builds, starts NATS and the services as separate
# processes on embedded defaults (SQLite under data/), waits until each is ready, shows the
# mesh working, then keeps running until Ctrl-C and shuts everything down cleanly.
# MILLRACE_DEMO_EXIT=1 exits after the demonstration instead of waiting.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

source scripts/mesh.sh
start_mesh

show() { # method url [json body] [extra curl args...]
    local method=$1 url=$2 body=${3:-}; shift 3 2>/dev/null || shift $#
    printf '\n$ curl -X %s %s %s\n' "$method" "$url" "${body:+-d '$body'}"
    if [ -n "$body" ]; then
        curl -sS -X "$method" "$url" -H 'content-type: application/json' "$@" -d "$body" -w '\n  → HTTP %{http_code}\n'
    else
        curl -sS -X "$method" "$url" "$@" -w '\n  → HTTP %{http_code}\n'
    fi
}

# Asks over the OpenAI-compatible streaming API, printing the answer as it streams, then the
# stored row's outcome and per-stage timings.
ask() { # user session text
    printf '\n  %s> %s\n  ' "$1" "$3"
    python3 scripts/py/demo-ask.py "$INGEST" "$1" "$2" "$3"
}

bold "1. a short conversation, streamed as it is generated (POST /v1/chat/completions, stream: true)"
ask ada s1 "What is the capital of France?"
ask ada s1 "What is it famous for?"
ask ada s1 "Thank you!"

bold "2. a query that must be blocked"
ask mallory m1 "you are a fucking idiot"

bold "3. a retried submit with the same Idempotency-Key is the same request"
show POST $INGEST/v1/queries '{"user":"bob","text":"Hello"}' -H 'Idempotency-Key: demo-key-1'
show POST $INGEST/v1/queries '{"user":"bob","text":"Hello"}' -H 'Idempotency-Key: demo-key-1'

bold "4. bad input gets a specific error and nothing else is touched"
show POST $INGEST/v1/queries '{"user":"ada","text":"   "}'
show POST $INGEST/v1/queries '{"user":"ada","text":"hi","model":"gpt-9"}'
show POST $INGEST/v1/queries '{"user":"ada","text":'

bold "5. stream depths (NATS monitoring /jsz): the edges drain as the stages ack"
curl -sS 'http://127.0.0.1:8222/jsz?streams=true' | python3 scripts/py/demo-stream-depths.py

bold "6. rows in the sink (GET $SINK/v1/results)"
curl -sS "$SINK/v1/results?page_size=20" | python3 scripts/py/demo-results.py

bold "Millrace is running"
cat <<INFO
  ingest   HTTP $INGEST/v1/queries · $INGEST/v1/chat/completions (OpenAI) · ws://127.0.0.1:8080/v1/ws
           gRPC 127.0.0.1:50051 (millrace.v1.Ingest: Submit, Generate; reflection on)
  sink     HTTP $SINK/v1/results     gRPC 127.0.0.1:50057 (millrace.v1.Results)
  gRPC     inference 127.0.0.1:50055 (Generate, Embed, Classify) · moderation :50053 (Check)
           session :50054 (Get, Delete)
  metrics  http://127.0.0.1:<admin>/metrics — ingest 9180, preprocess 9181, moderation 9182,
           session 9183, batcher 9184, inference 9185, sink 9187
  NATS     $MILLRACE_NATS_URL  monitoring http://127.0.0.1:8222
  data     $DATA/ (SQLite, JetStream store, logs)
INFO
if [ "${MILLRACE_DEMO_EXIT:-0}" = 1 ]; then exit 0; fi
echo "Ctrl-C stops everything."
while true; do sleep 3600 & wait $!; done
