#!/usr/bin/env bash
# Checks the observability files: Prometheus' config and alert rules with promtool (Debian's,
# fetched by scripts/promtool.sh when not on PATH), the rules' unit tests, and that the Grafana
# dashboard and the rules read only metrics that exist (scripts/py/check-observability.py,
# which parses their PromQL with a real parser).
#
#     scripts/check-observability.sh                         # names against the Rust source
#     scripts/check-observability.sh --metric-names FILE     # ... and against FILE, one exported
#                                                            # name a line (a running mesh's)
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
names_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --metric-names)
            [ $# -ge 2 ] || usage
            [ -f "$2" ] || { echo "[check-observability] no such file: $2" >&2; exit 1; }
            names_args=(--metric-names "$(realpath "$2")")
            shift 2 ;;
        -h|--help) usage ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
done

say() { printf '\033[1m[check-observability]\033[0m %s\n' "$*"; }
failed() { echo "[check-observability] FAILED: $*" >&2; exit 1; }

VENV=.tools/venv
REQUIREMENTS=scripts/py/requirements-observability.txt
[ -x "$VENV/bin/python" ] || failed "no $VENV: run scripts/setup.sh first"
if ! "$VENV/bin/python" scripts/py/requirements-satisfied.py "$REQUIREMENTS" >/dev/null; then
    say "installing $(grep -v '^#' "$REQUIREMENTS" | tr '\n' ' ')"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQUIREMENTS"
fi

PROMTOOL=scripts/promtool.sh
# First use fetches promtool (its progress on stderr), then the version line.
say "$("$PROMTOOL" --version | head -1)"

# rule_files is relative to the config file (alerts.yml beside it, as compose mounts them), so
# the repository's copy is what promtool loads; make sure the reference did resolve.
config=$("$PROMTOOL" check config deploy/prometheus/prometheus.yml 2>&1) \
    || { echo "$config" >&2; failed "promtool check config deploy/prometheus/prometheus.yml"; }
grep -q "Checking deploy/prometheus/alerts.yml" <<<"$config" \
    || { echo "$config" >&2; failed "prometheus.yml does not load deploy/prometheus/alerts.yml through rule_files"; }
say "prometheus.yml: valid, loads alerts.yml ($(grep -o '[0-9]* rules found' <<<"$config"))"

rules=$("$PROMTOOL" check rules deploy/prometheus/alerts.yml 2>&1) \
    || { echo "$rules" >&2; failed "promtool check rules deploy/prometheus/alerts.yml"; }
say "alerts.yml: valid, $(grep -o '[0-9]* rules found' <<<"$rules")"

tests=$("$PROMTOOL" test rules deploy/prometheus/alerts.test.yml 2>&1) \
    || { echo "$tests" >&2; failed "promtool test rules deploy/prometheus/alerts.test.yml"; }
say "alerts.test.yml: $(grep -c 'alertname:' deploy/prometheus/alerts.test.yml) cases in $(grep -c '^  - name:' deploy/prometheus/alerts.test.yml) tests, $(tail -1 <<<"$tests" | tr -d ' ')"

"$VENV/bin/python" scripts/py/check-observability.py "${names_args[@]}" || failed "metric names (above)"
