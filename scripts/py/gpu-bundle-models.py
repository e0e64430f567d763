"""Copies the named models' files from a prepared models folder into a GPU bundle, with a
manifest naming only them whose ONNX Runtime library is the bundle's GPU build (STAGE/ort/,
its sha256 recomputed). Used by scripts/gpu-bench.sh bundle.

    python3 scripts/py/gpu-bundle-models.py models/prepared STAGE MODEL...
"""

import glob
import hashlib
import json
import os
import shutil
import sys

src, stage, keep = sys.argv[1], sys.argv[2], sys.argv[3:]
manifest = json.load(open(f"{src}/manifest.json"))
manifest["models"] = [m for m in manifest["models"] if m["name"] in keep]
missing = set(keep) - {m["name"] for m in manifest["models"]}
if missing:
    sys.exit(f"not in {src}/manifest.json: {sorted(missing)} (run scripts/prepare-models.sh)")
for m in manifest["models"]:
    for f in m["files"]:
        os.makedirs(os.path.dirname(f"{stage}/models/{f}"), exist_ok=True)
        shutil.copyfile(f"{src}/{f}", f"{stage}/models/{f}")
lib = glob.glob(f"{stage}/ort/libonnxruntime.so.*")[0]
manifest["onnxruntime"]["library"] = "../ort/" + os.path.basename(lib)
manifest["onnxruntime"]["sha256"] = hashlib.sha256(open(lib, "rb").read()).hexdigest()
json.dump(manifest, open(f"{stage}/models/manifest.json", "w"), indent=2)
