#!/usr/bin/env bash
# The engine bench on the CUDA execution provider, for a GPU host with CUDA 13 that has no
# Rust toolchain (and maybe no internet): build a bundle here, carry it over, run it there.
#
#   scripts/gpu-bench.sh bundle [DIR]   here: release bench binary + SmolLM2 + ONNX Runtime GPU
#                                       libraries (PyPI onnxruntime-gpu==1.31.1) in DIR
#                                       (default target/gpu-bundle), also split into 50 MiB parts
#   scripts/gpu-bench.sh run DIR        there: joins the parts if needed, points ORT_DYLIB_PATH
#                                       at the GPU build, puts NVIDIA's Python CUDA 13 / cuDNN
#                                       libraries on LD_LIBRARY_PATH, runs the bench on cuda and
#                                       on cpu, and prints both tables
#
# MILLRACE_BENCH_BATCHES (default 1,8,32) picks the batch sizes.
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_GPU_VERSION=1.31.1
mode=${1:-}
dir=${2:-target/gpu-bundle}

case "$mode" in
bundle)
    scripts/setup.sh
    rm -rf "$dir" && mkdir -p "$dir/models/smollm2-135m" "$dir/ort"
    cargo bench -p millrace-engine --bench generate --no-run 2>&1 | tail -1
    bench=$(ls -t target/release/deps/generate-* | grep -v '\.d$' | head -1)
    cp "$bench" "$dir/engine-bench"
    cp models/prepared/manifest.json "$dir/models/"
    cp models/prepared/smollm2-135m/* "$dir/models/smollm2-135m/"
    wheel_dir=models/prepared/cache/gpu
    mkdir -p "$wheel_dir"
    ls "$wheel_dir"/onnxruntime_gpu-$ORT_GPU_VERSION-*.whl >/dev/null 2>&1 \
        || .tools/venv/bin/pip download -q --no-deps -d "$wheel_dir" "onnxruntime-gpu==$ORT_GPU_VERSION"
    .tools/venv/bin/python - "$wheel_dir" "$dir/ort" <<'PY'
import glob, sys, zipfile
wheel = sorted(glob.glob(f"{sys.argv[1]}/onnxruntime_gpu-*.whl"))[-1]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = name.rsplit("/", 1)[-1]
        if name.startswith("onnxruntime/capi/") and base.startswith("libonnxruntime"):
            with z.open(name) as src, open(f"{sys.argv[2]}/{base}", "wb") as dst:
                dst.write(src.read())
PY
    # The GPU library keeps its versioned name; the bench is told where it is.
    tar -C "$dir" -cf "$dir.tar" .
    split -b 50M -d "$dir.tar" "$dir.tar.part-"
    rm "$dir.tar"
    ls -la "$dir" "$dir/ort"
    echo "bundle: $dir (and $dir.tar.part-*: carry each part, then: cat parts > b.tar && tar -xf b.tar -C DIR)"
    ;;
run)
    [ -d "$dir" ] || { echo "no bundle at $dir" >&2; exit 1; }
    if ls "$dir".tar.part-* >/dev/null 2>&1 && [ ! -x "$dir/engine-bench" ]; then
        cat "$dir".tar.part-* > "$dir.tar" && tar -xf "$dir.tar" -C "$dir" && rm "$dir.tar"
    fi
    ort_lib=$(ls "$dir"/ort/libonnxruntime.so.* | head -1)
    site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
    nvidia_libs=$(ls -d "$site"/nvidia/*/lib "$site"/nvidia/cu13/lib 2>/dev/null | sort -u | paste -sd: -)
    export LD_LIBRARY_PATH="$dir/ort:${nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export ORT_DYLIB_PATH=$ort_lib MILLRACE_MODELS_DIR=$dir/models
    export MILLRACE_BENCH_BATCHES=${MILLRACE_BENCH_BATCHES:-1,8,32}
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    MILLRACE_PROVIDER=cuda "$dir/engine-bench"
    MILLRACE_PROVIDER=cpu "$dir/engine-bench"
    ;;
*)
    sed -n '2,14p' "$0" >&2
    exit 2
    ;;
esac
