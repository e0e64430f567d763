#!/usr/bin/env bash
# The whole test suite: installs what it needs, starts a real PostgreSQL for the PostgreSQL
# tests, builds every binary (the tests run them as child processes) and runs all tests.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

# The official OpenAI Python client and LangChain's ChatOpenAI, which the OpenAI-compatible
# API's test drives.
.tools/venv/bin/python -c 'import openai, langchain_openai' 2>/dev/null \
    || .tools/venv/bin/pip install -q --disable-pip-version-check "openai==3.57.0" "langchain-openai==1.8.1"

# The model preparation's tests (pytest pinned in models/requirements-test.txt), before cargo's.
.tools/venv/bin/python -c 'import pytest' 2>/dev/null \
    || .tools/venv/bin/pip install -q --disable-pip-version-check -r models/requirements-test.txt
.tools/venv/bin/python -m pytest -q models/tests
scripts/check-k8s.sh  # k8s/ rendered, schema-validated (Kubernetes, KEDA), semantic checks, nats-server -t
scripts/check-observability.sh  # promtool: prometheus.yml, alert rules and their unit tests; dashboard and rule metric names

if pg_env=$(scripts/postgres.sh start); then
    eval "$pg_env"
    trap 'scripts/postgres.sh stop "$PG_TEST_DIR"' EXIT
    echo "[test] PostgreSQL at $MILLRACE_TEST_POSTGRES_URL"
else
    echo "[test] PostgreSQL could not be started: the PostgreSQL tests will say SKIPPED (and fail under MILLRACE_REQUIRE_REAL=1, as in CI)" >&2
fi

cargo build --workspace --bins --locked
cargo test --workspace --locked -- "$@"
