#!/usr/bin/env bash
# Prepares the models the services load (ONNX models, tokenizers, libonnxruntime) under
# models/prepared/ and writes models/prepared/manifest.json. Idempotent: steps whose outputs are
# already there are skipped, so a second run takes seconds. See models/README.md.
#
#   scripts/prepare-models.sh               build what is missing, check what was built
#   scripts/prepare-models.sh --tiny        also build tiny-llama (benchmark decoder)
#   scripts/prepare-models.sh --check-only  rerun the checks only
#   scripts/prepare-models.sh --force       rebuild and recheck everything
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.tools/venv
REQUIREMENTS=models/requirements.txt

say() { printf '\033[1m[prepare-models]\033[0m %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
    echo "no Python environment at $VENV: run scripts/setup.sh first" >&2
    exit 1
fi

# Install the pinned dependencies unless every pin is already satisfied (checked without pip,
# which takes a second or more even when there is nothing to do).
if ! "$VENV/bin/python" scripts/py/requirements-satisfied.py "$REQUIREMENTS"; then
    say "installing $REQUIREMENTS into $VENV"
    find_links=()
    # The onnxruntime wheel may already be in the model cache: lets this work offline.
    [ -d models/prepared/cache ] && find_links=(--find-links models/prepared/cache)
    "$VENV/bin/pip" install -q --disable-pip-version-check "${find_links[@]}" -r "$REQUIREMENTS"
fi

exec "$VENV/bin/python" models/prepare.py "$@"
