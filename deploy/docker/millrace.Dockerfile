# Millrace's image for CI (scripts/images.sh): the runtime stage of the repository's Dockerfile,
# built on the local Debian base (which already has ca-certificates and libstdc++6) from the
# host's binaries and prepared models instead of the builder and models stages — the engine has
# no BuildKit and no registry to pull rust: and python: images from. Everything from the user
# to the CMD must stay identical to the Dockerfile's runtime stage; a test in deploy/e2e checks.
#
# Context (staged by scripts/images.sh): bin/ (the seven services), models/ (manifest.json, the
# models, onnxruntime/), millrace-healthcheck.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN true \
 && groupadd --gid 10001 millrace \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/millrace --shell /usr/sbin/nologin millrace \
 && install -d -o 10001 -g 10001 /var/lib/millrace
COPY bin/ /usr/local/bin/
COPY models/ /models/
COPY millrace-healthcheck /usr/local/bin/millrace-healthcheck
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
