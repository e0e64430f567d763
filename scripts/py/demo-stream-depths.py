"""Prints each JetStream stream's message count from NATS monitoring's /jsz?streams=true JSON
on standard input. Used by scripts/run.sh's demo.

    curl -sS 'http://127.0.0.1:8222/jsz?streams=true' | python3 scripts/py/demo-stream-depths.py
"""

import json
import sys

for account in json.load(sys.stdin).get("account_details", []):
    for stream in account.get("stream_detail", []):
        print(f"  {stream['name']:<16} {stream['state']['messages']:>4} messages")
