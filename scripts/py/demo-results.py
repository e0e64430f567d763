"""Prints the sink's stored rows (GET /v1/results JSON on standard input) as a table. Used by
scripts/run.sh's demo.

    curl -sS "$SINK/v1/results?page_size=20" | python3 scripts/py/demo-results.py
"""

import json
import sys

rows = json.load(sys.stdin)["results"]
print(f"  {'request_id':<38} {'user':<8} {'status':<15} {'reason':<12} completion")
for r in rows:
    text = r["completion"].replace("\n", " ")
    print(f"  {r['request_id']:<38} {r['user']:<8} {r['status']:<15} {r['reason'][:12]:<12} {text[:40]}")
print(f"  ({len(rows)} rows)")
