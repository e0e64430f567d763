"""Extracts from an onnxruntime-gpu wheel only the libraries the CUDA execution provider needs
(not TensorRT, not the Python binding). Used by scripts/gpu-bench.sh and the Dockerfile.

    python3 scripts/extract-ort-gpu.py WHEEL_DIR OUT_DIR
"""
import glob
import shutil
import sys
import zipfile

WANTED = ("libonnxruntime.so.", "libonnxruntime_providers_shared.so", "libonnxruntime_providers_cuda.so")

wheel_dir, out_dir = sys.argv[1:3]
wheel = sorted(glob.glob(f"{wheel_dir}/onnxruntime_gpu-*.whl"))[-1]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = name.rsplit("/", 1)[-1]
        if name.startswith("onnxruntime/capi/") and base.startswith(WANTED):
            with z.open(name) as src, open(f"{out_dir}/{base}", "wb") as dst:
                shutil.copyfileobj(src, dst)
            print("extracted", base)
