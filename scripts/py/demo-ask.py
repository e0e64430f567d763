"""Asks one question over the OpenAI-compatible streaming API and prints the answer as it
streams, then the stored row's outcome and per-stage timings. Used by scripts/run.sh's demo.

    python3 scripts/py/demo-ask.py INGEST_URL USER SESSION TEXT
"""

import json
import sys
import time
import urllib.request

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
