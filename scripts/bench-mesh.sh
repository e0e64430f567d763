#!/usr/bin/env bash
# The mesh benchmarks (release build; NATS and the seven services as processes on this machine,
# file-backed streams as deployed, driven by loadtest/). Reports go to target/bench/.
#
#   scripts/bench-mesh.sh overhead   the whole chain with tiny-llama (1 layer, width 16: the model
#                                    costs ~nothing, every code path is the real one): the maximum
#                                    sustained requests/s, p50/p99 at 25/50/75 % of it; then the
#                                    bare 7-hop JetStream relay chain (bus bench) on the same machine
#   scripts/bench-mesh.sh model      SmolLM2, 32 new tokens: completions/s through the whole mesh at
#                                    saturation ÷ the engine bench's best completions/s, same run
#   scripts/bench-mesh.sh            both
#
# MILLRACE_BENCH_API (grpc) picks the client API; MILLRACE_LOADTEST_* set any loadtest flag.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
export MILLRACE_PROFILE=release
source scripts/mesh.sh
mode=${1:-all}
API=${MILLRACE_BENCH_API:-grpc}
OUT=target/bench
mkdir -p "$OUT"
# Benchmarks measure the mesh, not its logging or a per-user rate limit.
export MILLRACE_LOG=${MILLRACE_LOG:-warn} MILLRACE_SESSION_RATE_PER_S=1000000 MILLRACE_SESSION_BURST=1000000

# Starts a fresh mesh serving one model (new data folder: no earlier streams or sessions).
fresh_mesh() { # model
    export MILLRACE_DATA_DIR
    MILLRACE_DATA_DIR=$(mktemp -d -t millrace-bench-XXXX)
    unset MILLRACE_DATABASE_URL
    export MILLRACE_INFERENCE_MODEL=$1 MILLRACE_INGEST_ALLOWED_MODELS=$1
    start_mesh
}

overhead() {
    fresh_mesh tiny-llama
    bold "mesh overhead: find the maximum sustained rate (tiny-llama, $API)"
    target/release/loadtest find-max --api "$API" --model tiny-llama --max-new-tokens 32 \
        --start-rate 50 --step-factor 1.5 --step-duration-s 10 --refine 2 \
        --fractions 0.25,0.5,0.75 --fraction-duration-s 20 --users 256 --out "$OUT/mesh-overhead"
    stop_all
    bold "bare 7-hop JetStream relay chain (bus bench, same machine)"
    MILLRACE_BENCH=chain,ramp cargo bench -p millrace-bus --bench bus 2>&1 | grep -v '^\s*\(Compiling\|Finished\|Running\)'
}

model() {
    bold "engine bench: SmolLM2, 32 new tokens, the engine alone"
    rm -f "$OUT/engine-generate.json"
    MILLRACE_BENCH_BATCHES=${MILLRACE_BENCH_BATCHES:-1,8,16,32} MILLRACE_BENCH_JSON="$PWD/$OUT/engine-generate.json" \
        cargo bench -p millrace-engine --bench generate 2>&1 | tee "$OUT/engine-bench.txt" | grep '^|'
    # Batches as large as the engine bench's best; one batch in flight, so that under load the
    # next batch gathers everything that arrived while the last one ran (inference has one
    # session: a second batch in flight would only wait there, small); short prompts, like
    # the engine bench's.
    export MILLRACE_MAX_BATCH_SIZE=32 MILLRACE_MAX_IN_FLIGHT=1
    fresh_mesh smollm2-135m
    bold "model-bound: completions/s through the whole mesh at saturation (SmolLM2, $API)"
    target/release/loadtest find-max --api "$API" --model smollm2-135m --max-new-tokens 32 \
        --start-rate 3 --step-factor 1.25 --step-duration-s 45 --refine 2 --drain-timeout-s 60 \
        --prompt-mix short=1 --users 256 --deadline-ms 120000 --out "$OUT/mesh-model"
    stop_all
    .tools/venv/bin/python scripts/py/bench-efficiency.py "$OUT/engine-generate.json" "$OUT/mesh-model/results.json"
}

case "$mode" in
overhead) overhead ;;
model) model ;;
all) overhead; model ;;
*) sed -n '2,14p' "$0" >&2; exit 2 ;;
esac
