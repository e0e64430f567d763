#!/usr/bin/env bash
# The mesh benchmarks (release build; NATS and the seven services as processes on this machine,
# file-backed streams as deployed, driven by loadtest/). Reports go to target/bench/.
#
#   scripts/bench-mesh.sh overhead   the whole chain with tiny-llama (1 layer, width 16: the model
#                                    costs ~nothing, every code path is the real one): the maximum
#                                    sustained requests/s, p50/p99 at 25/50/75 % of it; then the
#                                    bare 7-hop JetStream relay chain (bus bench) on the same machine
#   scripts/bench-mesh.sh model      SmolLM2, exactly 32 new tokens per request (EOS ignored): generated
#                                    tokens/s through the whole mesh at saturation ÷ the engine
#                                    bench's best static-batch tokens/s on the same lengths, same run
#   scripts/bench-mesh.sh serving    the model's scheduling (issue 12): the engine bench (static
#                                    batches next to Python onnxruntime on the same batches;
#                                    static vs continuous on one Poisson schedule; prefix reuse),
#                                    then goodput through the whole mesh — the highest open-loop
#                                    rate with e2e p99 ≤ 2 s, SmolLM2, 16 new tokens, 4-turn
#                                    conversations — with continuous and with static batching
#   scripts/bench-mesh.sh            overhead and model
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
    bold "engine bench: SmolLM2, static batches of 32 new tokens (EOS ignored), the engine alone"
    MILLRACE_BENCH_SECTIONS=static MILLRACE_BENCH_BATCHES=${MILLRACE_BENCH_BATCHES:-1,8,16,32} \
        MILLRACE_BENCH_JSON="$PWD/$OUT/engine-generate.json" \
        cargo bench -p millrace-engine --bench generate 2>&1 | tee "$OUT/engine-bench.txt" | grep '^|'
    fresh_mesh smollm2-135m
    bold "model-bound: generated tokens/s through the whole mesh at saturation (SmolLM2, 32 new tokens, $API)"
    target/release/loadtest find-max --api "$API" --model smollm2-135m --max-new-tokens 32 --ignore-eos \
        --start-rate 1 --step-factor 1.25 --step-duration-s 45 --refine 2 --drain-timeout-s 60 \
        --prompt-mix short=1 --users 256 --deadline-ms 120000 --out "$OUT/mesh-model"
    stop_all
    .tools/venv/bin/python scripts/py/bench-efficiency.py "$OUT/engine-generate.json" "$OUT/mesh-model/results.json"
}

# Prefix-cache counters of the running inference (admissions, hits, tokens reused vs computed).
prefix_figures() {
    curl -s http://127.0.0.1:9185/metrics | grep -E '^millrace_inference_(admitted|prefix_hits|tokens)_total'
}

serving() {
    # The OpenAI streaming API, as chat clients use it (MILLRACE_BENCH_API picks another).
    local api=${MILLRACE_BENCH_API:-http}
    bold "engine bench: static batches, serving static vs continuous, prefix reuse (SmolLM2)"
    MILLRACE_INTRA_THREADS=${MILLRACE_INTRA_THREADS:-2} MILLRACE_BENCH_JSON="$PWD/$OUT/engine-serving.json" \
        cargo bench -p millrace-engine --bench generate 2>&1 | tee "$OUT/engine-serving.txt" | grep -v '^\s*\(Compiling\|Finished\|Running\)'
    bold "Python onnxruntime, the same static batches"
    .tools/venv/bin/python scripts/py/ort-generate-bench.py target/bench/engine-workload.json "$OUT/ort-generate.json"
    for policy in continuous static; do
        MILLRACE_INFERENCE_BATCHING=$policy fresh_mesh smollm2-135m
        bold "goodput, $policy batching: highest rate with e2e p99 ≤ 2 s (16 new tokens, 4-turn conversations, $api)"
        target/release/loadtest find-max --api "$api" --model smollm2-135m --max-new-tokens 16 --turns 4 \
            --start-rate "${MILLRACE_BENCH_START_RATE:-0.5}" --step-factor 1.4 --step-duration-s 30 --refine 1 \
            --max-p99-ms 2000 --drain-timeout-s 30 --users 32 --out "$OUT/serving-$policy"
        prefix_figures | tee "$OUT/serving-$policy-prefix.txt"
        stop_all
    done
}

case "$mode" in
overhead) overhead ;;
model) model ;;
serving) serving ;;
all) overhead; model ;;
*) sed -n '2,14p' "$0" >&2; exit 2 ;;
esac
