"""Prints the mesh's model-bound efficiency: generated tokens/s the whole mesh sustained (the
loadtest's find-max results.json, run with --ignore-eos so every completion is exactly
max_new_tokens long) over the engine bench's best static-batch tokens/s on the same lengths (the
JSON the engine bench writes to MILLRACE_BENCH_JSON). Used by scripts/bench-mesh.sh model.

    .tools/venv/bin/python scripts/py/bench-efficiency.py ENGINE_JSON MESH_RESULTS_JSON
"""

import json
import sys

engine_report = json.load(open(sys.argv[1]))
engine = max(row["new_tokens_per_s"] for row in engine_report["static"]["rows"])
mesh = json.load(open(sys.argv[2]))
settings = mesh["settings"]
if not settings.get("ignore_eos"):
    sys.exit("the mesh run must use --ignore-eos: otherwise completions differ in length from the engine's")
best = (mesh["find_max"]["max_sustained_rps"] or 0.0) * settings["max_new_tokens"]
print(f"engine best {engine:.1f} tokens/s; mesh sustained {best:.1f} tokens/s; "
      f"efficiency {best / engine:.2f} (target ≥ 0.95)")
