#!/usr/bin/env bash
# Builds every container image the compose stack needs, with no container registry: a Debian
# base from Debian's packages (debootstrap + `docker import`), and from it NATS, PostgreSQL,
# Prometheus and Millrace's own image (the host's service binaries + prepared models).
#
#   scripts/images.sh                 # all images; prints nothing but progress on stderr
#   scripts/images.sh --env           # ... and prints `export MILLRACE_*_IMAGE=…` for compose
#   scripts/images.sh nats            # only these (base is built when a named image needs it)
#   MILLRACE_IMAGE_PROFILE=release scripts/images.sh millrace   # binaries of target/release
#
# Each image's tag is a digest of its inputs (the recipe below, the files it copies), so an
# image already in the engine is reused, and a changed input builds a new one. The base's root
# file system is also kept as a tar under .tools/images/ so an engine without it imports it
# again instead of bootstrapping. compose.yaml names the official images; the variables this
# prints swap only the image names (docs/deploy.md, "CI").
set -euo pipefail
cd "$(dirname "$0")/.."
# Set below to the images this call built or found; never taken from the caller's environment.
unset NATS_IMAGE POSTGRES_IMAGE PROMETHEUS_IMAGE MILLRACE_IMAGE
root=$PWD

say() { echo "[images] $*" >&2; }

SUITE=bookworm
MIRROR=${MILLRACE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The base: what the services need at run time (libstdc++ for ONNX Runtime, certificates), wget
# for the NATS and Prometheus health checks (as in the official alpine/busybox images),
# PostgreSQL and Prometheus (with promtool). procps for debugging inside a container.
BASE_PACKAGES=(ca-certificates libstdc++6 wget procps postgresql-15 prometheus)
PROFILE=${MILLRACE_IMAGE_PROFILE:-debug}
CACHE=.tools/images
mkdir -p "$CACHE"

digest() { sha256sum | cut -c1-12; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }
# Older tags of the image just built go: an image is rebuilt on every change of the binaries.
# One still used by a container (or by a derived image) stays until the next build.
drop_older() { # drop_older <repository:tag>
    docker images --format '{{.Repository}}:{{.Tag}}' "${1%%:*}" | grep -vxF "$1" \
        | xargs -r docker rmi >/dev/null 2>&1 || true
}

# Legacy builder: this engine (Debian's docker.io 20.10) has no buildx, so the CI images use
# only instructions the classic builder knows (no cache mounts, no heredocs).
build() { # build <tag> <dockerfile> <context> [--build-arg …]
    local tag=$1 file=$2 context=$3
    shift 3
    if have_image "$tag"; then say "$tag: present"; return; fi
    say "$tag: building"
    DOCKER_BUILDKIT=0 docker build -q -f "$file" -t "$tag" "$@" "$context" >/dev/null
    drop_older "$tag"
}

base_tag() {
    printf '%s\n' "$SUITE" "${BASE_PACKAGES[*]}" "$(declare -f bootstrap_base)" | digest | sed 's/^/millrace-ci\/base:/'
}

install_debootstrap() {
    command -v debootstrap >/dev/null && return
    say "installing debootstrap (Debian package)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q debootstrap >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q debootstrap >/dev/null; }
}

# The recipe of the base; its text is part of the base's digest.
bootstrap_base() { # bootstrap_base <rootfs folder>
    local rootfs=$1
    rm -rf "$rootfs"
    # minbase first, then the packages through apt inside it with services kept from starting
    # (policy-rc.d), so the installers' postinst scripts do not start PostgreSQL in the chroot.
    debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" >&2
    printf '#!/bin/sh\nexit 101\n' > "$rootfs/usr/sbin/policy-rc.d"
    chmod 0755 "$rootfs/usr/sbin/policy-rc.d"
    chroot "$rootfs" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${BASE_PACKAGES[@]}" >&2
    # The package's default cluster (15/main) is not used: the PostgreSQL image makes its own.
    chroot "$rootfs" pg_dropcluster 15 main
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
}

ensure_base() {
    BASE=$(base_tag)
    have_image "$BASE" && { say "$BASE: present"; return; }
    local tar="$CACHE/${BASE#millrace-ci/base:}.tar"
    if [[ ! -s $tar ]]; then
        say "$BASE: debootstrap $SUITE (a few minutes, once)"
        local rootfs="$CACHE/rootfs"
        install_debootstrap
        bootstrap_base "$rootfs"
        tar -C "$rootfs" --numeric-owner -cf "$tar.partial" .
        mv "$tar.partial" "$tar"
        rm -rf "$rootfs"
        find "$CACHE" -maxdepth 1 -name '*.tar' ! -name "$(basename "$tar")" -delete
    fi
    say "$BASE: docker import"
    docker import -c 'CMD ["bash"]' "$tar" "$BASE" >/dev/null
    drop_older "$BASE"
}

# A tag from the Dockerfile, the base and every file the image copies.
files_tag() { # files_tag <name> <dockerfile> <files…>
    local name=$1
    shift
    { echo "$BASE"; cat "$@"; } | digest | sed "s/^/millrace-ci\/$name:/"
}

build_nats() {
    local bin=.tools/venv/bin/nats-server context=target/images/nats
    [[ -x $bin ]] || { echo "$bin is missing: run scripts/setup.sh" >&2; exit 1; }
    NATS_IMAGE=$(files_tag nats deploy/docker/nats.Dockerfile "$bin")
    have_image "$NATS_IMAGE" || { rm -rf "$context"; mkdir -p "$context"; cp "$bin" "$context/"; }
    build "$NATS_IMAGE" deploy/docker/nats.Dockerfile "$context" --build-arg "BASE_IMAGE=$BASE"
}

build_postgres() {
    POSTGRES_IMAGE=$(files_tag postgres deploy/docker/postgres.Dockerfile deploy/docker/postgres-entrypoint.sh)
    build "$POSTGRES_IMAGE" deploy/docker/postgres.Dockerfile deploy/docker --build-arg "BASE_IMAGE=$BASE"
}

build_prometheus() {
    PROMETHEUS_IMAGE=$(files_tag prometheus deploy/docker/prometheus.Dockerfile)
    build "$PROMETHEUS_IMAGE" deploy/docker/prometheus.Dockerfile deploy/docker --build-arg "BASE_IMAGE=$BASE"
}

SERVICES=(ingest preprocess moderation session batcher inference sink)

# The context holds the binaries (debug info stripped: the image is for running, and a debug
# build's symbols are most of its size), the prepared models the services load (not the
# download cache; the manifest names every model prepared here) and the health check.
build_millrace() {
    local bins="target/$PROFILE" context=target/images/millrace
    for s in "${SERVICES[@]}"; do
        [[ -x $bins/$s ]] || { echo "$bins/$s is missing: cargo build --workspace --bins${PROFILE/debug/}" >&2; exit 1; }
    done
    [[ -s models/prepared/manifest.json ]] || { echo "models are not prepared: run scripts/setup.sh" >&2; exit 1; }
    local models
    models=$(cd models/prepared && find . -mindepth 1 -maxdepth 1 ! -name cache | sort)
    MILLRACE_IMAGE=$(
        { echo "$BASE"; cat deploy/docker/millrace.Dockerfile deploy/docker/millrace-healthcheck;
          for s in "${SERVICES[@]}"; do cat "$bins/$s"; done
          (cd models/prepared && find $models -type f -print0 | sort -z | xargs -0 cat); } \
            | digest | sed 's/^/millrace-ci\/millrace:/'
    )
    if ! have_image "$MILLRACE_IMAGE"; then
        say "$MILLRACE_IMAGE: staging binaries ($PROFILE) and models"
        rm -rf "$context"
        mkdir -p "$context/bin" "$context/models"
        for s in "${SERVICES[@]}"; do objcopy --strip-debug "$bins/$s" "$context/bin/$s"; done
        # shellcheck disable=SC2086 # the model entries are plain names without spaces
        (cd models/prepared && cp -a $models "$root/$context/models/")
        cp deploy/docker/millrace-healthcheck "$context/"
    fi
    build "$MILLRACE_IMAGE" deploy/docker/millrace.Dockerfile "$context" --build-arg "BASE_IMAGE=$BASE"
}

print_env=false
targets=()
for arg in "$@"; do
    case $arg in
        --env) print_env=true ;;
        base | nats | postgres | prometheus | millrace) targets+=("$arg") ;;
        *) echo "usage: scripts/images.sh [--env] [base|nats|postgres|prometheus|millrace]…" >&2; exit 2 ;;
    esac
done
((${#targets[@]})) || targets=(nats postgres prometheus millrace)

ensure_base
for t in "${targets[@]}"; do
    [[ $t == base ]] || "build_$t"
done

if $print_env; then
    echo "export MILLRACE_BASE_IMAGE=$BASE"
    for var in NATS_IMAGE POSTGRES_IMAGE PROMETHEUS_IMAGE MILLRACE_IMAGE; do
        # Only the images built by this call; MILLRACE_IMAGE keeps its name, the rest get the prefix.
        if [[ -n ${!var:-} ]]; then
            name=$var
            [[ $var == MILLRACE_IMAGE ]] || name=MILLRACE_$var
            echo "export $name=${!var}"
        fi
    done
fi
