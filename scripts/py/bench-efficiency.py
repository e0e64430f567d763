"""Prints the mesh's model-bound efficiency: the completions/s the whole mesh sustained (the
loadtest's find-max results.json) over the engine bench's best completions/s (the JSON the
engine bench writes to MILLRACE_BENCH_JSON). Used by scripts/bench-mesh.sh model.

    .tools/venv/bin/python scripts/py/bench-efficiency.py ENGINE_JSON MESH_RESULTS_JSON
"""

import json
import sys

engine_report = json.load(open(sys.argv[1]))
engine = max(row["completions_per_s"] for row in engine_report["rows"])
mesh = json.load(open(sys.argv[2]))
best = mesh["find_max"]["max_sustained_rps"] or 0.0
print(f"engine best {engine:.2f} completions/s; mesh sustained {best:.2f} completions/s; "
      f"efficiency {best / engine:.2f} (target ≥ 0.85)")
