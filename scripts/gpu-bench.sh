#!/usr/bin/env bash
# The engine's model tests and bench on the CUDA execution provider, for a GPU host with CUDA 13
# that has no Rust toolchain (and maybe no internet): build a bundle here, carry it over in
# parts, run it there.
#
#   scripts/gpu-bench.sh bundle [DIR]   here: stripped release binaries (engine bench + the
#       engine's model tests), the SmolLM2 / MiniLM / profanity models with a manifest naming
#       only them, and from PyPI onnxruntime-gpu==1.31.1 only libonnxruntime.so.*,
#       libonnxruntime_providers_shared.so and libonnxruntime_providers_cuda.so; as an
#       xz-compressed tar in DIR/parts/part-NN-of-MM (at most 60 MiB each), the parts also
#       copied to target/gpu-parts/ (git-ignored, so a device call can carry them), and a
#       runbook in DIR/RUNBOOK.md. DIR defaults to target/gpu-bundle.
#   scripts/gpu-bench.sh run DIR        there: joins and unpacks the parts found in DIR (or
#       DIR/parts), puts NVIDIA's Python CUDA 13 / cuDNN libraries on LD_LIBRARY_PATH, then
#       runs the model tests on cuda, the bench on cuda and (MILLRACE_GPU_CPU_BASELINE=1) the
#       bench on cpu. Every step runs whatever the others did; exits non-zero if any failed.
#
# Size: the CUDA provider's kernels are kept for one GPU architecture only (MILLRACE_GPU_SM,
# default 90 = H100/H200; the other architectures' cubins are zeroed, which cuts ~130 MB of
# compressed parts). MILLRACE_GPU_SM=all keeps them all. When pruned, the unpruned provider is
# also packed, as DIR/fallback/cuda-full-NN-of-MM: carry those too only if the pruned one fails;
# `run` puts it in place of the pruned one when it finds them.
#
# Env for `run`: MILLRACE_BENCH_BATCHES (default 1,8,32), MILLRACE_GPU_TEST_ARGS (extra args for
# the test binary, e.g. a name filter), MILLRACE_GPU_STEP_TIMEOUT (seconds per step, default 240),
# MILLRACE_GPU_CPU_BASELINE=1, MILLRACE_GPU_PROVIDER (default cuda; cpu checks a bundle anywhere).
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_GPU_VERSION=1.31.1
PART_SIZE=60M
MODELS=(smollm2-135m minilm-l6 profanity)
mode=${1:-}
dir=${2:-target/gpu-bundle}

# Zeroes, in every fatbin of a CUDA library that holds a cubin for sm_<keep>, the payloads of its
# other cubins: headers and offsets stay as they are, the driver picks sm_<keep> as before, and
# the zeros compress to nothing. Fatbins without a sm_<keep> cubin are left whole.
prune_fatbins() {
    python3 - "$@" <<'PY'
import struct, sys
path, keep = sys.argv[1], int(sys.argv[2])
data = bytearray(open(path, "rb").read())
shoff, = struct.unpack_from("<Q", data, 0x28)
shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
def section(i):
    name, _, _, _, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
    return name, off, size
_, stroff, _ = section(shstrndx)
def name_of(n):
    return bytes(data[stroff + n:data.index(b"\0", stroff + n)]).decode()
fatbin = [section(i) for i in range(shnum) if name_of(section(i)[0]) == ".nv_fatbin"]
if not fatbin:
    sys.exit(f"{path}: no .nv_fatbin section")
_, pos, size = fatbin[0]
end, kept, zeroed = pos + size, 0, 0
while pos + 16 <= end:
    magic, _, header, fat = struct.unpack_from("<IHHQ", data, pos)
    if magic != 0xBA55ED50:  # alignment padding between fatbins
        pos += 8
        continue
    entries, e = [], pos + header
    while e < pos + header + fat:
        _, _, entry_header, payload = struct.unpack_from("<HHIQ", data, e)
        arch, = struct.unpack_from("<I", data, e + 28)
        entries.append((arch, e + entry_header, payload))
        e += entry_header + payload
    if any(arch == keep for arch, _, _ in entries):
        for arch, start, n in entries:
            if arch == keep:
                kept += n
            else:
                data[start:start + n] = bytes(n)
                zeroed += n
    pos += header + fat
open(path, "wb").write(data)
print(f"  {path}: kept {kept / 1e6:.0f} MB of sm_{keep} kernels, zeroed {zeroed / 1e6:.0f} MB of others")
PY
}

# Splits archive $1 into $3/$2-NN-of-MM, each at most PART_SIZE.
split_parts() {
    local archive=$1 prefix=$2 out=$3 f n
    rm -rf "$out" && mkdir -p "$out"
    split -b "$PART_SIZE" -d -a 2 "$archive" "$out/$prefix-"
    n=$(printf '%02d' "$(ls "$out" | wc -l)")
    for f in "$out/$prefix"-??; do mv "$f" "$f-of-$n"; done
}

# Cargo's executable for the given build arguments (the last artifact it reports).
executable() {
    cargo "$@" --message-format=json-render-diagnostics \
        | python3 -c 'import json, sys
exes = [m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact" and m.get("executable")]
print(exes[-1])'
}

write_runbook() {
    local parts=("$dir"/parts/part-*) fallback=("$dir"/fallback/cuda-full-*) n i=0 f tree_kib
    n=${#parts[@]}
    # What travels with every device call besides the carried part: the repo's working tree.
    tree_kib=$( (git ls-files; git ls-files --others --exclude-standard) | sort -u \
        | xargs -r -d '\n' stat -c %s -- 2>/dev/null | awk '{s += $1} END {print int(s / 1024)}' || true)
    {
        echo "# GPU runbook (generated by scripts/gpu-bench.sh bundle, $(date -u +%FT%TZ))"
        echo
        echo "The parts are at target/gpu-parts/ in /work/main (git-ignored; carried with \`carry\`, not"
        echo "through git; plain files, since links do not travel). Each device call carries one part"
        echo "(at most 60 MiB, under the 64 MiB limit) and copies it to /tmp/b, which stays while the"
        echo "machine is warm (~30 s idle): make the calls back to back. The last call also runs"
        echo "everything (the script travels as a working-tree file of the repo). The 64 MiB a call may"
        echo "carry includes the working tree (about $tree_kib KiB now): carry nothing else with a part."
        echo "If the machine went cold between calls, /tmp/b is gone: \`run\` names the missing parts;"
        echo "carry them again."
        echo
        echo "Parts ($n, $(du -cb "${parts[@]}" | tail -1 | cut -f1) bytes):"
        echo
        for f in "${parts[@]}"; do echo "- $(basename "$f"): $(stat -c %s "$f") bytes"; done
        echo
        for f in "${parts[@]}"; do
            i=$((i + 1))
            local b; b=$(basename "$f")
            echo "## Call $i of $n"
            echo
            echo "carry: [\"target/gpu-parts/$b\"]"
            echo
            if [ "$i" -lt "$n" ]; then
                echo '```'
                echo "mkdir -p /tmp/b && cp target/gpu-parts/$b /tmp/b/ && ls -la /tmp/b && (nvidia-smi -L || true)"
                echo '```'
            else
                echo "timeout_s: 600"
                echo
                echo '```'
                echo "mkdir -p /tmp/b && cp target/gpu-parts/$b /tmp/b/ && MILLRACE_GPU_CPU_BASELINE=1 bash scripts/gpu-bench.sh run /tmp/b 2>&1 | tee \"\$OUT/gpu-run.log\"; exit \${PIPESTATUS[0]}"
                echo '```'
            fi
            echo
        done
        echo "The run prints a section per step and a summary; each step is limited to"
        echo "MILLRACE_GPU_STEP_TIMEOUT seconds (default 240). Drop MILLRACE_GPU_CPU_BASELINE=1 to skip"
        echo "the cpu bench. To rerun on the same warm machine: \`bash scripts/gpu-bench.sh run /tmp/b\`"
        echo "(the bundle is already unpacked in /tmp/b/bundle)."
        if [ -e "${fallback[0]}" ]; then
            echo
            echo "## Only if CUDA kernels fail to load"
            echo
            echo "The bundle's CUDA provider keeps sm_${MILLRACE_GPU_SM:-90} kernels only. If the cuda steps fail"
            echo "with \"no kernel image is available\" / \"invalid device function\" / a corrupt-image error,"
            echo "carry the unpruned provider the same way, one call each, then rerun:"
            echo
            for f in "${fallback[@]}"; do
                echo "- carry [\"target/gpu-parts/$(basename "$f")\"]: \`mkdir -p /tmp/b && cp target/gpu-parts/$(basename "$f") /tmp/b/\`"
            done
            echo "- then \`bash scripts/gpu-bench.sh run /tmp/b\` (it unpacks the full provider over the pruned one)."
        fi
    } > "$dir/RUNBOOK.md"
}

case "$mode" in
bundle)
    scripts/setup.sh
    sm=${MILLRACE_GPU_SM:-90}
    stage=$dir/bundle
    rm -rf "$stage" "$dir/parts" "$dir/fallback" "$dir"/*.tar.xz
    mkdir -p "$stage/models" "$stage/ort"
    echo "building the release engine bench and model tests"
    bench=$(executable bench -p millrace-engine --bench generate --no-run)
    tests=$(executable test --release -p millrace-engine --test models --no-run)
    cp "$bench" "$stage/engine-bench" && cp "$tests" "$stage/engine-tests"
    strip "$stage/engine-bench" "$stage/engine-tests"

    wheel_dir=models/prepared/cache/gpu
    mkdir -p "$wheel_dir"
    ls "$wheel_dir"/onnxruntime_gpu-$ORT_GPU_VERSION-*.whl >/dev/null 2>&1 \
        || .tools/venv/bin/pip download -q --no-deps -d "$wheel_dir" "onnxruntime-gpu==$ORT_GPU_VERSION"
    python3 scripts/extract-ort-gpu.py "$wheel_dir" "$stage/ort"
    chmod +x "$stage"/ort/*

    # The models, and a manifest naming only them, whose library is the GPU build.
    python3 - models/prepared "$stage" "${MODELS[@]}" <<'PY'
import glob, hashlib, json, os, shutil, sys
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
PY

    if [ "$sm" != all ]; then
        echo "pruning the CUDA provider to sm_$sm"
        full=$dir/cuda-full
        rm -rf "$full" && mkdir -p "$full"
        cp "$stage/ort/libonnxruntime_providers_cuda.so" "$full/"
        prune_fatbins "$stage/ort/libonnxruntime_providers_cuda.so" "$sm"
    fi
    echo "compressing (xz -6, 2 threads)"
    (cd "$stage" && find . -type f | sort | xargs ls -la)
    tar -C "$stage" -cf - . | xz -T2 -6 > "$dir/bundle.tar.xz"
    split_parts "$dir/bundle.tar.xz" part "$dir/parts"
    if [ "$sm" != all ]; then
        tar -C "$full" -cf - . | xz -T2 -6 > "$dir/cuda-full.tar.xz"
        split_parts "$dir/cuda-full.tar.xz" cuda-full "$dir/fallback"
        rm -rf "$full"
    fi
    rm -f "$dir"/*.tar.xz
    rm -rf target/gpu-parts && mkdir -p target/gpu-parts
    cp "$dir"/parts/* target/gpu-parts/
    if [ -d "$dir/fallback" ]; then cp "$dir"/fallback/* target/gpu-parts/; fi
    write_runbook
    ls -la "$dir/parts" "$dir/fallback" 2>/dev/null || true
    echo "bundle: $dir/bundle, parts in $dir/parts (copied to target/gpu-parts/), runbook $dir/RUNBOOK.md"
    ;;
run)
    [ -d "$dir" ] || { echo "no bundle at $dir" >&2; exit 1; }
    dir=$(cd "$dir" && pwd)
    bundle=$dir/bundle
    section() { printf '\n==== %s ====\n' "$*"; }
    # xz, or Python's lzma where xz is not installed.
    unxz_stream() { if command -v xz >/dev/null; then xz -dc; else python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)'; fi; }
    # Joins the parts $1-NN-of-MM (each in DIR, DIR/parts or DIR/fallback) and unpacks them
    # into $2; returns 1 when there are none, exits when some are missing or unpacking fails.
    unpack() {
        local prefix=$1 into=$2 first count i name d found parts=() missing=()
        first=$( (ls "$dir/$prefix"-00-of-* "$dir/parts/$prefix"-00-of-* "$dir/fallback/$prefix"-00-of-* 2>/dev/null || true) | head -1)
        [ -n "$first" ] || return 1
        count=${first##*-of-}
        for ((i = 0; i < 10#$count; i++)); do
            name=$(printf '%s-%02d-of-%s' "$prefix" "$i" "$count")
            found=""
            for d in "$dir" "$dir/parts" "$dir/fallback"; do [ -f "$d/$name" ] && { found=$d/$name; break; }; done
            if [ -n "$found" ]; then parts+=("$found"); else missing+=("$name"); fi
        done
        if [ ${#missing[@]} -gt 0 ]; then
            echo "missing ${missing[*]}: carry every part first" >&2
            exit 1
        fi
        echo "unpacking ${parts[*]##*/} into $into"
        mkdir -p "$into"
        cat "${parts[@]}" | unxz_stream | tar -x -C "$into" || { echo "unpacking ${parts[*]##*/} failed" >&2; exit 1; }
    }
    section "bundle"
    if [ ! -e "$bundle/.unpacked" ]; then
        unpack part "$bundle" || { echo "no bundle parts (part-NN-of-MM) in $dir or $dir/parts" >&2; exit 1; }
        touch "$bundle/.unpacked"
    fi
    if [ ! -e "$bundle/ort/.cuda-full" ] && unpack cuda-full "$bundle/ort"; then
        touch "$bundle/ort/.cuda-full"
        echo "the unpruned CUDA provider replaces the pruned one"
    fi
    ls -la "$bundle" "$bundle/ort"

    section "CUDA libraries"
    # NVIDIA's pip wheels (nvidia-*-cu13, nvidia-cudnn-*) put their libraries under
    # <site-packages>/nvidia/cu13/lib and nvidia/<name>/lib.
    sites=$(python3 -c 'import site, sys
print("\n".join(site.getsitepackages() + [site.getusersitepackages()] + sys.path))' 2>/dev/null || true)
    sites+=$'\n'$(ls -d /usr/local/lib/python3*/dist-packages /usr/local/lib/python3*/site-packages \
        /usr/lib/python3/dist-packages /opt/conda/lib/python3*/site-packages 2>/dev/null || true)
    sites+=$'\n'$( (python3 -m pip show nvidia-cublas nvidia-cublas-cu13 nvidia-cuda-runtime nvidia-cudnn-cu13 2>/dev/null || true) | sed -n 's/^Location: //p')
    nvidia_libs=$(for s in $sites; do ls -d "$s"/nvidia/cu13/lib "$s"/nvidia/*/lib 2>/dev/null || true; done | awk '!seen[$0]++' | paste -sd: -)
    # The first folder of nvidia_libs holding library $1.
    find_lib() { local d; for d in ${nvidia_libs//:/ }; do [ -e "$d/$1" ] && { echo "$d/$1"; return; }; done; }
    for lib in libcublasLt.so.13 libcudnn.so.9; do
        # Not in any site-packages: look anywhere on the disk (20 s at most).
        if [ -z "$(find_lib "$lib")" ]; then
            found=$(timeout 20 find / -xdev -name "$lib" 2>/dev/null | head -1 || true)
            [ -n "$found" ] && nvidia_libs=${nvidia_libs:+$nvidia_libs:}$(dirname "$found")
        fi
    done
    echo "site-packages searched: $(echo "$sites" | awk 'NF && !seen[$0]++' | paste -sd' ' -)"
    echo "NVIDIA library folders: ${nvidia_libs:-none found}"
    export LD_LIBRARY_PATH="$bundle/ort${nvidia_libs:+:$nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    echo "the CUDA provider's libraries (linked):"
    ldd "$bundle/ort/libonnxruntime_providers_cuda.so" | grep -E 'cu|nv|not found' || true
    echo "and loaded at run time:"
    for lib in libcudnn.so.9 libnvrtc.so.13 libcufft.so.12; do
        where=$(find_lib "$lib" || true)
        echo "  $lib => ${where:-not found}"
    done
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader || echo "nvidia-smi failed"

    export ORT_DYLIB_PATH=$(ls "$bundle"/ort/libonnxruntime.so.* | head -1) MILLRACE_MODELS_DIR=$bundle/models
    export MILLRACE_BENCH_BATCHES=${MILLRACE_BENCH_BATCHES:-1,8,32}
    provider=${MILLRACE_GPU_PROVIDER:-cuda}
    limit=${MILLRACE_GPU_STEP_TIMEOUT:-240}
    results=() failed=0
    step() {
        local name=$1 started=$SECONDS rc=0
        shift
        section "$name"
        timeout "$limit" env "$@" || rc=$?
        [ "$rc" -eq 124 ] && echo "timed out after ${limit}s"
        results+=("$(printf '%-28s exit %3d  %4ds' "$name" "$rc" $((SECONDS - started)))")
        [ "$rc" -eq 0 ] || failed=1
    }
    # shellcheck disable=SC2086 # MILLRACE_GPU_TEST_ARGS is a list of words
    step "engine tests ($provider)" MILLRACE_PROVIDER="$provider" "$bundle/engine-tests" --test-threads=1 ${MILLRACE_GPU_TEST_ARGS:-}
    step "engine bench ($provider)" MILLRACE_PROVIDER="$provider" "$bundle/engine-bench"
    if [ "${MILLRACE_GPU_CPU_BASELINE:-0}" = 1 ] && [ "$provider" != cpu ]; then
        step "engine bench (cpu)" MILLRACE_PROVIDER=cpu "$bundle/engine-bench"
    fi
    section "summary"
    printf '%s\n' "${results[@]}"
    exit "$failed"
    ;;
*)
    sed -n '2,27p' "$0" >&2
    exit 2
    ;;
esac
