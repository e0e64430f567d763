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
    python3 - "$INGEST" "$1" "$2" "$3" <<'PY'
import json, sys, time, urllib.request
base, user, session, text = sys.argv[1:]
body = {"messages": [{"role": "user", "content": text}], "user": user, "max_tokens": 48, "stream": True}
request = urllib.request.Request(f"{base}/v1/chat/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json", "x-session-id": session})
finish = None
with urllib.request.urlopen(request) as response:
    request_id = response.headers["x-request-id"]
    for line in response:
        data = line.decode().strip().removeprefix("data: ")
        if not data or data == "[DONE]":
            continue
        event = json.loads(data)
        if "error" in event:
            finish = event["error"]["code"]
            continue
        choice = event["choices"][0]
        print(choice["delta"].get("content", ""), end="", flush=True)
        finish = choice["finish_reason"] or finish
print()
for _ in range(100):  # the sink writes rows in small batches
    row = json.load(urllib.request.urlopen(f"{base}/v1/queries/{request_id}"))
    if row["status"] != "PENDING":
        break
    time.sleep(0.05)
timings = row.get("timings") or []
total = (timings[-1]["finished_unix_us"] - timings[0]["received_unix_us"]) / 1000 if timings else 0
print(f"  [{row['status']}{' · ' + row['reason'] if row.get('reason') else ''} · finish_reason {finish}]")
print("    " + " → ".join(f"{t['stage']} {(t['finished_unix_us'] - t['received_unix_us']) / 1000:.1f}ms" for t in timings)
      + f"  (total {total:.0f} ms)")
PY
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
print(f"  {'request_id':<38} {'user':<8} {'status':<15} {'reason':<12} completion")
for r in rows:
    text = r["completion"].replace("\n", " ")
    print(f"  {r['request_id']:<38} {r['user']:<8} {r['status']:<15} {r['reason'][:12]:<12} {text[:40]}")
print(f"  ({len(rows)} rows)")
PY
)"

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
