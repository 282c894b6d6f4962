"""The Grafana dashboard and the Prometheus alert rules, proven against the real thing.

* ``promtool check rules`` and ``promtool test rules`` on ``alerts/``.
* Every metric and label the dashboard and the rules name is one poolguard
  exports through the OpenTelemetry Prometheus exporter (in-process, with the
  not-yet-filled metrics given a value).
* End to end: ``examples/prometheus_service.py --workload`` scraped by a real
  ``prometheus`` server (loopback only) that loads the rules; every PromQL
  expression of the dashboard and of the rules must return data, every name
  must be known to that Prometheus, and the alerts must reach ``firing``.

``promtool``/``prometheus`` (Debian's ``prometheus`` package) and
``opentelemetry-exporter-prometheus`` missing skip these tests locally; with
``CI`` or ``POOLGUARD_REQUIRE_DATABASES=1`` set (``.ci/run``) they fail instead.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

import pytest
import sqlalchemy as sa

import poolguard

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "dashboards" / "poolguard.json"
RULES = ROOT / "alerts" / "poolguard-rules.yml"
RULE_TESTS = ROOT / "alerts" / "poolguard-rules.test.yml"
EXAMPLE = ROOT / "examples" / "prometheus_service.py"

POOL_LABEL = "db_client_connection_pool_name"
SERVICE = "poolguard-e2e"

#: Metrics the end-to-end workload may leave without series (expressions using
#: only these may come back empty, their alerts may stay quiet). The example
#: service sheds background work and runs a breaker, so every other metric the
#: dashboard and the rules name must have data; it has no PgBouncer, so
#: PgBouncer's numbers (``pgbouncer_admin_url``) are the exception, and it
#: leaves isolate_culprits off (its hogs are there to make the pool alerts
#: fire), so the culprit metrics have none (the exported-names test turns it
#: on and finds them).
NOT_YET_FILLED: frozenset[str] = frozenset({
    "poolguard_pgbouncer_up", "poolguard_pgbouncer_clients_active",
    "poolguard_pgbouncer_clients_waiting", "poolguard_pgbouncer_servers_active",
    "poolguard_pgbouncer_servers_idle", "poolguard_pgbouncer_pool_size",
    "poolguard_pgbouncer_wait_max_seconds",
    "poolguard_culprit_isolated", "poolguard_culprit_isolations_total",
})

#: Alerts that fire only during a real outage (the example's breaker stays
#: closed: it reports state "closed", so the metric has data, but the "open"
#: condition has none). Their expressions may be empty and the alerts quiet;
#: the promtool tests prove they fire on open-breaker data.
QUIET_WITHOUT_OUTAGE = frozenset({"PoolguardCircuitBreakerOpen"})

#: Grafana's built-in variables, as the end-to-end test substitutes them.
GRAFANA_BUILTINS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}
#: The dashboard's own variables, all set to "All" (their allValue).
DASHBOARD_VARIABLES = ("service", "pool", "instance")

_TRUTHY = frozenset({"1", "true", "yes", "on"})
_FALSY = frozenset({"", "0", "false", "no", "off"})


# -- required or skipped -------------------------------------------------------


def _required() -> bool:
    """True in CI: a missing tool fails the test instead of skipping it."""
    ci = os.environ.get("CI", "").strip().lower()
    require = os.environ.get("POOLGUARD_REQUIRE_DATABASES", "").strip().lower()
    return ci not in _FALSY or require in _TRUTHY


def _unavailable(reason: str) -> NoReturn:
    if _required():
        pytest.fail(f"{reason} (required: CI or POOLGUARD_REQUIRE_DATABASES=1 is set)")
    pytest.skip(reason)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        _unavailable(f"{name} not found (apt-get install prometheus)")
    return path


def _need_exporter() -> None:
    try:
        for module in ("opentelemetry.exporter.prometheus", "opentelemetry.sdk.metrics"):
            importlib.import_module(module)
    except ImportError as exc:
        _unavailable(f"opentelemetry-exporter-prometheus not installed ({exc})")


# -- reading the dashboard and the rules ----------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def _panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every query target of the dashboard."""
    return [
        (panel["title"], target)
        for panel in _panels(dashboard()["panels"])
        for target in panel.get("targets", [])
    ]


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every query of the dashboard."""
    return [(title, target["expr"]) for title, target in dashboard_targets()]


def variable_queries() -> list[tuple[str, str, str]]:
    """(variable, selector, label) of the dashboard's ``label_values()`` variables."""
    out = []
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        assert match, f"variable {var['name']}: not a label_values() query: {query!r}"
        out.append((var["name"], match.group(1), match.group(2)))
    return out


def rule_file_exprs(text: str) -> list[tuple[str, str]]:
    """(alert name, expr) of every rule of a rules file.

    A small reader for the two YAML forms the file uses (``expr: ...`` on one
    line, or a block scalar ``expr: |`` / ``>-``), so no YAML library is needed;
    the count is checked against the ``- alert:`` entries, and the end-to-end
    test checks the same rules as Prometheus parsed them.
    """
    lines = text.splitlines()
    out: list[tuple[str, str]] = []
    name = ""
    for i, line in enumerate(lines):
        if m := re.match(r"\s*- (?:alert|record):\s*(\S+)", line):
            name = m.group(1)
        m = re.match(r"(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        indent, value = len(m.group(1)), m.group(2).strip()
        if value and value[0] not in "|>":
            out.append((name, value))
            continue
        block = []
        for following in lines[i + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following.strip())
        out.append((name, "\n".join(block).strip()))
    entries = re.findall(r"(?m)^\s*- (?:alert|record):", text)
    assert len(out) == len(entries), "every rule needs exactly one expr"
    return out


# -- PromQL names ------------------------------------------------------------------

_KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan",
})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w.$])[A-Za-z_:][\w:]*")


def _strip_strings(expr: str) -> str:
    return _STRING.sub('""', expr)


def _metric_tokens(expr: str) -> list[tuple[str, bool]]:
    """(name, has a label matcher block) for each metric an expression selects."""
    text = re.sub(r"\{[^}]*\}", "{}", _strip_strings(expr))  # keep only the braces
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = _GROUPING.sub(" ", text)
    tokens = []
    for match in _IDENT.finditer(text):
        token, rest = match.group(), text[match.end():].lstrip()
        if rest.startswith("(") or token.lower() in _KEYWORDS:
            continue  # a function, an aggregation or a keyword
        tokens.append((token, rest.startswith("{")))
    return tokens


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords and labels left out)."""
    return {name for name, _ in _metric_tokens(expr)}


def label_names(expr: str, legend: str = "") -> set[str]:
    """Label names an expression matches on or groups by, and a legend uses."""
    text = _strip_strings(expr)
    names: set[str] = set()
    for group in _GROUPING.findall(text):
        names.update(n.strip() for n in group.split(",") if n.strip())
    for matchers in re.findall(r"\{([^}]*)\}", text):
        names.update(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    names.update(re.findall(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}", legend))
    return names


def unknown_metrics(exprs: Iterable[tuple[str, str]], known: set[str]) -> list[str]:
    """``where: name`` for each metric an expression names that is not in ``known``."""
    return sorted({
        f"{where}: {name}"
        for where, expr in exprs
        for name in metric_names(expr)
        if name not in known
    })


def all_named_exprs() -> list[tuple[str, str]]:
    """Every expression of the dashboard (targets and variables) and the rules."""
    return [
        *((f"panel {title!r}", expr) for title, expr in dashboard_exprs()),
        *((f"variable {name!r}", sel) for name, sel, _ in variable_queries()),
        *((f"rule {name}", expr) for name, expr in rule_file_exprs(RULES.read_text())),
    ]


def substitute(expr: str) -> str:
    """The expression as Grafana sends it with every variable on "All"."""
    for name, value in GRAFANA_BUILTINS.items():
        expr = expr.replace(name, value)
    for name in DASHBOARD_VARIABLES:
        expr = re.sub(rf"\$(?:{name}\b|\{{{name}\}})", ".*", expr)
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr


# -- static checks --------------------------------------------------------------------


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (job, le) (rate(foo_seconds_bucket{job=~"$service", '
        'x="a{b}"}[$__rate_interval]))) / on (job) group_left bar_total offset 5m '
        "> bool 1e3 and topk(5, baz)"
    )
    assert metric_names(expr) == {"foo_seconds_bucket", "bar_total", "baz"}
    assert label_names(expr, "{{job}} {{ x }}") == {"job", "le", "x"}
    # A panel naming a metric poolguard does not export is reported.
    known = {"db_client_connection_count"}
    exprs = [("panel 'ok'", 'sum(db_client_connection_count{state="used"})'),
             ("panel 'typo'", "sum(rate(db_client_connection_timeout_total[5m]))")]
    assert unknown_metrics(exprs, known) == ["panel 'typo': db_client_connection_timeout_total"]


def test_dashboard_is_a_fleet_view() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in DASHBOARD_VARIABLES:
        assert variables[name]["includeAll"], name
        assert variables[name]["allValue"] == ".*", name
    ids = [p["id"] for p in _panels(board["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    targets = dashboard_targets()
    assert len(targets) >= 20
    for title, target in targets:
        expr = target["expr"]
        assert target["datasource"]["uid"] == "${datasource}", title
        # Every selector filters on the three variables, and none is bare.
        assert all(braces for _, braces in _metric_tokens(expr)), (title, expr)
        for matchers in re.findall(r"[A-Za-z_:][\w:]*\{([^}]*)\}", expr):
            for needed in ('job=~"$service"', f'{POOL_LABEL}=~"$pool"',
                           'instance=~"$instance"'):
                assert needed in matchers, (title, expr)
        # Every query aggregates (the e2e test checks no result keeps `instance`).
        assert re.search(r"\b(?:sum|max|min|avg|topk|count)\b\s*(?:by\s*\([^)]*\)\s*)?\(",
                         expr), (title, expr)
    needed_metrics = {name for _, expr in dashboard_exprs() for name in metric_names(expr)}
    for metric in (
        "db_client_connection_count", "db_client_connection_max",
        "db_client_connection_pending_requests", "db_client_connection_timeouts_total",
        "db_client_connection_wait_time_seconds_bucket",
        "db_client_connection_use_time_seconds_bucket",
        "db_client_operation_duration_seconds_bucket", "poolguard_rejections_total",
        "poolguard_circuit_breaker_state", "poolguard_query_time_seconds_total",
        "poolguard_culprit_isolated", "poolguard_culprit_isolations_total",
    ):
        assert metric in needed_metrics, f"the dashboard has no panel on {metric}"


def test_rules_have_for_severity_and_guidance() -> None:
    text = RULES.read_text()
    blocks = re.split(r"(?m)^\s*- alert:", text)[1:]
    assert len(blocks) == 10
    for block in blocks:
        name = block.split()[0]
        assert re.search(r"(?m)^\s+for: \d+[smh]$", block), name
        assert re.search(r"(?m)^\s+severity: (?:warning|critical)$", block), name
        assert "summary:" in block, name
        assert "Look first at" in " ".join(block.split()), name
    tested = set(re.findall(r"(?m)^\s+alertname: (\S+)$", RULE_TESTS.read_text()))
    assert tested == {name for name, _ in rule_file_exprs(text)}


def test_promtool_check_and_test_rules() -> None:
    promtool = _tool("promtool")
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
        proc = subprocess.run(  # noqa: S603 - fixed arguments
            [promtool, *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}{proc.stderr}"
        assert "SUCCESS" in proc.stdout, proc.stdout


def _exposition(text: str) -> tuple[set[str], set[str]]:
    """Sample names and label names of a Prometheus text exposition."""
    names: set[str] = set()
    labels: set[str] = set()
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s", line)
        assert match, line
        names.add(match.group(1))
        labels.update(re.findall(r'([A-Za-z_]\w*)="', match.group(2) or ""))
    return names, labels


def test_dashboard_and_rules_name_only_exported_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every metric and label named is in the exporter's output (no server needed)."""
    _need_exporter()
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    engine = poolguard.wrap(
        sa.create_engine(f"sqlite:///{tmp_path / 'names.db'}", poolclass=sa.QueuePool,
                         pool_size=2, max_overflow=0),
        name="names", meter_provider=provider, breaker=True, breaker_per_tag=True,
        isolate_culprits=True,
    )
    try:
        guard = poolguard.get_guard(engine)
        with guard.breakers.lock:  # a tag's breaker, as its first outcome would make it
            guard.breakers.tag_breaker(poolguard.RequestContext(None, tag="report"))
        generate_latest(registry)  # the first collection: samples are kept from now on
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            with pytest.raises(sa.exc.OperationalError):
                conn.execute(sa.text("SELECT * FROM missing"))
        # The metrics of NOT_YET_FILLED, given the values their features will set.
        guard.rejections[("queue_full", "background")] = 1
        bouncer = poolguard.PgBouncerStats(
            "127.0.0.1:6432", "names", "app", "ok", 0.5, None, clients_active=3,
            clients_waiting=2, servers_active=2, servers_idle=0, servers_used=0, max_wait=1.5,
            pool_size=2)
        monkeypatch.setattr(guard.fleet, "pgbouncer", lambda: bouncer)
        names, labels = _exposition(generate_latest(registry).decode())
    finally:
        engine.dispose()
        provider.shutdown()

    assert names >= NOT_YET_FILLED
    exprs = all_named_exprs()
    assert unknown_metrics(exprs, names) == []
    used_labels = {label for _, expr in exprs for label in label_names(expr)}
    used_labels |= {label for _, target in dashboard_targets()
                    for label in label_names("", target.get("legendFormat", ""))}
    used_labels |= {label for _, _, label in variable_queries()}
    # job and instance are added by Prometheus at scrape time (or by the Collector).
    assert used_labels - labels - {"job", "instance"} == set()


# -- end to end ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrometheusAPI:
    """The few HTTP API calls the test needs."""

    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback http
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]  # type: ignore[no-any-return]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return f"--- {path.name} ---\n{text[-chars:]}"


def _wait_for(what: str, check: Any, timeout: float, logs: list[Path]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, AssertionError, ValueError):
            result = check()
            if result:
                return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout}s\n" + "\n".join(map(_tail, logs)))
        time.sleep(0.5)


def _problems(api: PrometheusAPI, rules: list[dict[str, Any]]) -> list[str]:
    """Everything not (yet) as it should be; empty when the test passes."""
    problems: list[str] = []
    known = set(api.get("/api/v1/label/__name__/values"))
    problems += [f"unknown metric in {m}" for m in unknown_metrics(
        all_named_exprs(), known | NOT_YET_FILLED)]

    for title, expr in dashboard_exprs():
        result = api.query(substitute(expr))
        if not result and not metric_names(expr) <= NOT_YET_FILLED:
            problems.append(f"panel {title!r}: no data for {substitute(expr)}")
        problems += [f"panel {title!r}: a series keeps `instance` (not a fleet view)"
                     for series in result if "instance" in series["metric"]]
    for name, selector, label in variable_queries():
        values = api.get(f"/api/v1/label/{label}/values",
                         **{"match[]": substitute(selector)})
        if not values:
            problems.append(f"variable {name!r}: no values of {label}")

    firing = {a["labels"]["alertname"] for a in api.get("/api/v1/alerts")["alerts"]
              if a["state"] == "firing"}
    for rule in rules:
        exempt = (metric_names(rule["query"]) <= NOT_YET_FILLED
                  or rule["name"] in QUIET_WITHOUT_OUTAGE)
        result = api.query(rule["query"])
        if not result and not exempt:
            problems.append(f"rule {rule['name']}: no data for {rule['query']}")
        for series in result:
            missing = {"job", "instance", POOL_LABEL} - set(series["metric"])
            if missing:
                problems.append(f"rule {rule['name']}: result without {sorted(missing)}")
        if not exempt and rule["name"] not in firing:
            problems.append(f"alert {rule['name']} is {rule.get('state')}, not firing")
    return problems


@pytest.mark.timing
def test_end_to_end_with_a_real_prometheus(tmp_path: Path) -> None:
    prometheus = _tool("prometheus")
    _need_exporter()
    service_log, prometheus_log = tmp_path / "service.log", tmp_path / "prometheus.log"
    logs = [service_log, prometheus_log]
    procs: list[subprocess.Popen[bytes]] = []
    files: list[IO[bytes]] = []

    def start(args: list[str], log: Path) -> None:
        out = log.open("wb")
        files.append(out)
        procs.append(subprocess.Popen(  # noqa: S603 - fixed arguments
            args, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path))

    try:
        # The example service with its pathological workload (bounded: 90 s).
        start([sys.executable, "-u", str(EXAMPLE), "--port", "0", "--workload",
               "--duration", "90", "--service-name", SERVICE,
               "--url", f"sqlite:///{tmp_path / 'example.db'}"], service_log)

        def service_port() -> int | None:
            m = re.search(r"serving metrics on http://127\.0\.0\.1:(\d+)/metrics",
                          service_log.read_text())
            return int(m.group(1)) if m else None

        port = _wait_for("the example service", service_port, 20, logs)

        # The rules as shipped, except `for:` shortened so the test does not
        # wait five minutes; every rule must still hold for 2 s of evaluations.
        rules = tmp_path / "rules.yml"
        rules.write_text(re.sub(r"(?m)^(\s+)for: \S+$", r"\1for: 2s", RULES.read_text()))
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {rules}\n"
            f"scrape_configs:\n  - job_name: {SERVICE}\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        )
        prom_port = _free_port()
        start([prometheus, f"--config.file={config}",
               f"--storage.tsdb.path={tmp_path / 'tsdb'}",
               f"--web.listen-address=127.0.0.1:{prom_port}",
               "--storage.tsdb.retention.time=1h", "--log.level=warn"], prometheus_log)
        api = PrometheusAPI(f"http://127.0.0.1:{prom_port}")

        def ready() -> bool:
            if any(p.poll() is not None for p in procs):
                pytest.fail("a subprocess exited early\n" + "\n".join(map(_tail, logs)))
            return bool(api.query(f'up{{job="{SERVICE}"}} == 1'))

        _wait_for("the first scrape", ready, 20, logs)

        # Prometheus loaded every rule of the file, with the shortened `for:`.
        loaded = [r for g in api.get("/api/v1/rules")["groups"] for r in g["rules"]]
        assert sorted(r["name"] for r in loaded) == sorted(
            name for name, _ in rule_file_exprs(RULES.read_text()))
        assert {r["duration"] for r in loaded} == {2}

        deadline = time.monotonic() + 40
        while True:
            loaded = [r for g in api.get("/api/v1/rules")["groups"] for r in g["rules"]]
            problems = _problems(api, loaded)
            if not problems:
                break
            if time.monotonic() > deadline:
                pytest.fail("\n".join(problems) + "\n" + "\n".join(map(_tail, logs)))
            time.sleep(1)

        alerts = api.get("/api/v1/alerts")["alerts"]
        utilisation = [a for a in alerts if a["labels"]["alertname"] ==
                       "PoolguardPoolUtilizationHigh"]
        assert [(a["state"], a["labels"]["job"], a["labels"][POOL_LABEL]) for a in
                utilisation] == [("firing", SERVICE, "example-db")]
        assert "Look first at" in utilisation[0]["annotations"]["description"]
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for out in files:
            out.close()
