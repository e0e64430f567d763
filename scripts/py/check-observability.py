"""Checks that the Grafana dashboard and the Prometheus alert rules only read metrics that exist,
and that every alert has a unit test that fires it and one that stays silent.

Every PromQL expression of deploy/grafana/dashboards/millrace.json (panel targets, query
variables) and of deploy/prometheus/alerts.yml is parsed with `promql-parser` (the Python
binding of the Rust promql-parser crate, a real PromQL parser), and every metric name its
selectors use is looked up:

- in the names the Rust source registers (`static X: LazyLock<metric type>` in the
  services and shared crates, a histogram as its `_bucket`/`_sum`/`_count` series), plus the
  prometheus crate's process collector that shared/runtime turns on;
- with `--metric-names FILE` (one name per line, e.g. Prometheus' /api/v1/label/__name__/values
  after a load burst), also in FILE: a histogram's `_bucket`/`_sum`/`_count` series count as
  present when FILE lists them or their base name; a name in SHOWN_AFTER_EVENT may be missing.

Names written by something other than Millrace are accepted only through ALLOWED_EXTERNAL below.
Exits 1 naming each problem.

    .tools/venv/bin/python scripts/py/check-observability.py [--metric-names FILE]
"""

import argparse
import json
import re
import sys
from pathlib import Path

import promql_parser
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/millrace.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
ALERT_TESTS = ROOT / "deploy/prometheus/alerts.test.yml"
# Crates whose metrics a running service exports (the test kit's literals are test data).
SOURCE_DIRS = [ROOT / "services", ROOT / "shared/bus", ROOT / "shared/runtime"]

# Names no Millrace service exports, each allowed on purpose. Keep this list short: anything
# here is not checked against what runs.
ALLOWED_EXTERNAL = {
    # Written by Prometheus itself for every scrape target (the target-down alert).
    "up": "Prometheus (scrape health)",
}
ALLOWED_EXTERNAL_PREFIXES = {
    # NVIDIA's dcgm-exporter on GPU nodes (the GPU memory alert); absent where there is no GPU,
    # so it can never be in a CPU run's list.
    "DCGM_": "NVIDIA dcgm-exporter",
}

# The prometheus crate's process collector (feature "process", enabled by shared/runtime on
# Linux): what it registers in the default registry that every admin server exposes.
PROCESS_COLLECTOR = {
    "process_cpu_seconds_total",
    "process_max_fds",
    "process_open_fds",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_threads",
    "process_virtual_memory_bytes",
}

# Registered by the services but exported only once something happens, so a load burst that
# does not make it happen leaves them out of an exported-names list. Each is still checked
# against the Rust source; keep the reason next to it.
SHOWN_AFTER_EVENT = {
    "millrace_batcher_queue_depth": "a priority's series exists only while requests of it are queued",
    "millrace_session_cas_conflicts_total": "registered at the first compare-and-set conflict",
    "millrace_session_rate_limited_total": "registered at the first rate-limited request",
    "millrace_session_turns_abandoned_total": "registered at the first request that ends without a completion",
    "millrace_session_turns_stored_total": "registered at the first stored exchange (a request with a session)",
}

HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")

# Grafana's interval variables stand where PromQL wants a duration; any other variable is
# refused, since what it expands to cannot be checked.
GRAFANA_DURATIONS = re.compile(r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}")
GRAFANA_VARIABLE = re.compile(r"\$\{?\w+")

METRIC_STATIC = re.compile(
    r"static\s+\w+\s*:\s*LazyLock<\s*((?:Int)?(?:Counter|Gauge|Histogram)(?:Vec)?)\s*>\s*=\s*LazyLock::new\("
)
METRIC_LITERAL = re.compile(r'"(millrace_[a-z0-9_]+)"')


def registered_names() -> set[str]:
    """The series names the Rust source registers; fails on a metrics.rs literal that is not a
    static's name (a registration this reader does not understand)."""
    names, problems = set(), []
    for base in SOURCE_DIRS:
        for path in sorted(base.glob("**/src/**/*.rs")):
            text = path.read_text()
            statics = list(METRIC_STATIC.finditer(text))
            claimed = set()
            for i, m in enumerate(statics):
                end = statics[i + 1].start() if i + 1 < len(statics) else len(text)
                literal = METRIC_LITERAL.search(text, m.end(), end)
                if literal is None:
                    problems.append(f"{path.relative_to(ROOT)}: static at offset {m.start()} names no millrace_ metric")
                    continue
                claimed.add(literal.start())
                name = literal.group(1)
                if m.group(1).startswith("Histogram"):
                    names.update(name + suffix for suffix in HISTOGRAM_SERIES)
                else:
                    names.add(name)
            if path.name == "metrics.rs":
                for literal in METRIC_LITERAL.finditer(text):
                    if literal.start() not in claimed:
                        problems.append(
                            f"{path.relative_to(ROOT)}: {literal.group(1)} is not the name of a "
                            "`static …: LazyLock<metric>`; this check cannot see how it is registered"
                        )
    if problems:
        fail(problems)
    return names | PROCESS_COLLECTOR


def listed_names(path: Path) -> set[str]:
    """FILE's names. Prometheus lists a histogram as its `_bucket`/`_sum`/`_count` series, which
    match as they are; a list of families (the `# TYPE` lines of /metrics) has the base name
    alone, which is taken to stand for those three series."""
    names = {line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}
    if not names:
        fail([f"{path}: no metric names"])
    return names | {name + suffix for name in names for suffix in HISTOGRAM_SERIES}


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every query of the dashboard, Grafana variables resolved."""
    board = json.loads(DASHBOARD.read_text())
    found = []

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(board.get("panels", [])):
        for target in panel.get("targets", []):
            if "expr" in target:
                found.append((f"dashboard panel {panel.get('id')} {panel.get('title')!r}", target["expr"]))
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            query = query.get("query", "") if isinstance(query, dict) else query or ""
            inner = re.fullmatch(r"\s*(?:label_values|query_result)\((.*?)(?:,\s*\w+)?\)\s*", query)
            found.append((f"dashboard variable {variable.get('name')!r}", inner.group(1) if inner else query))
    return found


def alert_expressions() -> tuple[list[tuple[str, str]], set[str], list[str]]:
    """(where, PromQL) of every rule, the names recording rules define, and the alert names."""
    rules = yaml.safe_load(ALERTS.read_text())
    found, recorded, alerts = [], set(), []
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            found.append((f"{ALERTS.relative_to(ROOT)} {group['name']}/{name}", str(rule["expr"])))
            if "record" in rule:
                recorded.add(rule["record"])
            else:
                alerts.append(rule["alert"])
    return found, recorded, alerts


def resolve_grafana(expr: str) -> str:
    expr = GRAFANA_DURATIONS.sub("5m", expr)
    leftover = GRAFANA_VARIABLE.search(expr)
    if leftover:
        raise ValueError(f"Grafana variable {leftover.group(0)} cannot be checked")
    return expr


def metric_names(expr: str) -> set[str]:
    """Every metric name the expression's selectors name (by name or by an exact __name__)."""
    names, problems = set(), []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__":
                    if matcher.op == promql_parser.MatchOp.Equal:
                        names.add(matcher.value)
                    else:
                        problems.append(f"__name__ {matcher.op} {matcher.value!r} cannot be checked")
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    if problems:
        raise ValueError("; ".join(problems))
    return names


def external(name: str) -> str | None:
    if name in ALLOWED_EXTERNAL:
        return ALLOWED_EXTERNAL[name]
    return next((who for prefix, who in ALLOWED_EXTERNAL_PREFIXES.items() if name.startswith(prefix)), None)


def alert_test_coverage(alerts: list[str]) -> list[str]:
    """Each alert needs a test where it fires and one where it stays silent."""
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    fires, silent = set(), set()
    for test in tests.get("tests", []):
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    problems = []
    for alert in alerts:
        if alert not in fires:
            problems.append(f"{ALERT_TESTS.relative_to(ROOT)}: no test where {alert} fires")
        if alert not in silent:
            problems.append(f"{ALERT_TESTS.relative_to(ROOT)}: no test where {alert} stays silent")
    return problems


def fail(problems: list[str]):
    for problem in problems:
        print(f"[check-observability] {problem}", file=sys.stderr)
    sys.exit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metric-names", type=Path, help="exported names, one a line (default: the Rust source's)")
    args = parser.parse_args()

    registered = registered_names()
    exported = listed_names(args.metric_names) if args.metric_names else None
    rule_exprs, recorded, alerts = alert_expressions()
    board_exprs = dashboard_expressions()
    problems, used = [], {}
    for where, expr in board_exprs + rule_exprs:
        try:
            names = metric_names(resolve_grafana(expr))
        except ValueError as e:
            problems.append(f"{where}: {e}: {expr}")
            continue
        for name in names:
            used.setdefault(name, []).append(where)
    not_seen = []
    for name, places in sorted(used.items()):
        if name in recorded or external(name):
            continue
        users = ", ".join(sorted(set(places)))
        if name not in registered:
            problems.append(f"{name} is not registered by the Rust source; used by {users}")
        elif exported is not None and name not in exported:
            if name in SHOWN_AFTER_EVENT:
                not_seen.append(name)
            else:
                problems.append(f"{name} is not in {args.metric_names}; used by {users}")
    problems += alert_test_coverage(alerts)
    if problems:
        fail(problems)
    externals = sorted(n for n in used if external(n))
    print(
        f"[check-observability] {len(used)} metric names in {len(board_exprs)} dashboard queries and "
        f"{len(rule_exprs)} rules: all registered by the Rust source"
        + (f" and exported in {args.metric_names}" if exported is not None else "")
        + (f" (not seen, allowed until their event: {', '.join(not_seen)})" if not_seen else "")
        + (f"; external, allowed: {', '.join(externals)}" if externals else "")
        + f"; each of {len(alerts)} alerts fires and stays silent in a test"
    )


if __name__ == "__main__":
    main()
