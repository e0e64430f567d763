"""Exits 0 when every `name==version` pin of a requirements file is installed in this Python
environment, else prints the missing ones and exits 1. Checked without pip, which takes a
second or more even when there is nothing to do. Used by scripts/prepare-models.sh.

    .tools/venv/bin/python scripts/py/requirements-satisfied.py models/requirements.txt
"""

import re
import sys
from importlib.metadata import PackageNotFoundError, version

missing = []
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, want = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line).groups()
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    if have != want:
        missing.append(f"{name}=={want} (have {have or 'none'})")
if missing:
    print("[prepare-models] not installed: " + ", ".join(missing))
    sys.exit(1)
