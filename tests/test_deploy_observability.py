"""The shipped Grafana dashboard and Prometheus alert rules: well formed, and every metric and
label value their PromQL uses exists in a real scrape of the gateway on the shipped config."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import loader as config
from gateway.core.types import OUTCOMES
from gateway.demo.simulator import Simulators
from gateway.ops.metrics import BREAKER_VALUES
from tests.serving import ROOT, product_view_config, serving_config

DASHBOARD = ROOT / "deploy" / "grafana" / "gateway-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"

TARGET_LABELS = frozenset({"job", "instance"})
"""Labels Prometheus attaches to every series of a target: never in the gateway's own scrape."""

PROMETHEUS_SERIES = frozenset({"up"})
"""Series Prometheus writes for each scrape itself."""

CACHE_EVENTS = (
    "hit",
    "miss",
    "stale",
    "bypass",
    "stale_if_error",
    "refresh",
    "refresh_failed",
    "error",
)
"""`gateway_cache_events_total`'s `event` values (cache/composite.py's `on_event`)."""

VOCABULARY: dict[str, frozenset[str]] = {
    "outcome": frozenset(OUTCOMES),
    "event": frozenset(CACHE_EVENTS),
    "state": frozenset(BREAKER_VALUES),
}
"""Label values the gateway may write that a short test run need not produce (stale, ...)."""

_IDENT = r"[A-Za-z_:][A-Za-z0-9_:]*"
_STRING = r'"(?:[^"\\]|\\.)*"'
_SELECTOR = re.compile(rf"(?<![\w.$])({_IDENT})?\s*\{{((?:[^}}\"]|{_STRING})*)\}}")
_MATCHER = re.compile(rf"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*({_STRING})\s*,?")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_BARE = re.compile(rf"(?<![\w.:$])({_IDENT})(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}
    | {"offset", "bool", "atan2", "inf", "nan", "Inf", "NaN"}
)
_LITERAL_ALTERNATIVES = re.compile(r"[\w /{}:-]+(?:\|[\w /{}:-]+)*")


@dataclass(frozen=True)
class Selector:
    """One vector selector of an expression: a metric name and its label matchers."""

    name: str
    matchers: tuple[tuple[str, str, str], ...] = ()


def selectors(expr: str) -> list[Selector]:
    """Return the vector selectors of a PromQL expression, in order of appearance (braced ones
    first), with function names, keywords, grouping labels, ranges and numbers left out."""
    found: list[Selector] = []

    def braced(m: re.Match[str]) -> str:
        body = m.group(2)
        matchers = tuple(
            (label, op, json.loads(value)) for label, op, value in _MATCHER.findall(body)
        )
        assert _MATCHER.sub("", body).strip() == "", f"unparsed matchers {body!r} in {expr!r}"
        named = [v for label, op, v in matchers if label == "__name__" and op == "="]
        name = m.group(1) or (named[0] if named else "")
        assert name, f"a selector without a metric name in {expr!r}"
        found.append(Selector(name, tuple(x for x in matchers if x[0] != "__name__")))
        return " SELECTOR "

    rest = _SELECTOR.sub(braced, expr)
    rest = re.sub(_STRING, '""', rest)
    rest = _GROUPING.sub(" ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)
    for name in _BARE.findall(rest):
        if name not in _KEYWORDS and name != "SELECTOR":
            found.append(Selector(name))
    return found


def test_selectors_finds_metrics_and_matchers_and_leaves_out_the_rest() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, source) (rate(gateway_call_duration_seconds_bucket"
        '{source=~"$source", endpoint="GET /p/{id:int}"}[5m] offset 10m))) > 1e3 * 2'
        " and on (job) absent(up) or 0 * sum without (call) (gateway_pool_max)"
    )
    assert selectors(expr) == [
        Selector(
            "gateway_call_duration_seconds_bucket",
            (("source", "=~", "$source"), ("endpoint", "=", "GET /p/{id:int}")),
        ),
        Selector("up"),
        Selector("gateway_pool_max"),
    ]
    assert selectors('{__name__="gateway_retries_total", source!="x"}') == [
        Selector("gateway_retries_total", (("source", "!=", "x"),))
    ]


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Yield every panel, those inside (collapsed) rows included."""
    for p in panels:
        yield p
        yield from dashboard_panels(p.get("panels", []))


def dashboard_exprs() -> dict[str, str]:
    """Return every PromQL expression of the dashboard's panels, by where it is."""
    board = json.loads(DASHBOARD.read_text())
    return {
        f"panel {p['title']!r} target {t['refId']}": t["expr"]
        for p in dashboard_panels(board["panels"])
        for t in p.get("targets", [])
    }


def dashboard_variable_queries() -> dict[str, tuple[str, str]]:
    """Return each query variable's `label_values(selector, label)` as (selector, label)."""
    board = json.loads(DASHBOARD.read_text())
    found = {}
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*([A-Za-z_]\w*)\)", query)
        assert m, f"variable {var['name']}: {query!r} is not label_values(selector, label)"
        found[f"variable {var['name']}"] = (m.group(1), m.group(2))
    return found


def alert_rules() -> list[dict[str, Any]]:
    """Return every rule of the alert file."""
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def all_exprs() -> dict[str, str]:
    """Return every PromQL expression the dashboard and the alert rules evaluate."""
    exprs = dashboard_exprs()
    exprs.update(
        {f"variable selector {k}": s for k, (s, _) in dashboard_variable_queries().items()}
    )
    for i, rule in enumerate(alert_rules()):
        exprs[f"alert {rule['alert']} #{i}"] = rule["expr"]
    return exprs


@dataclass
class Scrape:
    """What one `/metrics` scrape holds: every sample's labels by sample name, and the sample
    names each declared family may have, samples or not."""

    samples: dict[str, list[dict[str, str]]]
    declared: set[str]


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}


def parse_scrape(text: str) -> Scrape:
    samples: dict[str, list[dict[str, str]]] = {}
    declared: set[str] = set()
    for family in text_string_to_metric_families(text):
        declared.update(family.name + s for s in _SUFFIXES.get(family.type, ("",)))
        for s in family.samples:
            samples.setdefault(s.name, []).append(dict(s.labels))
    return Scrape(samples, declared)


def problems_of(where: str, sel: Selector, scrape: Scrape) -> Iterator[str]:
    """Yield what `sel` asks of the scrape that is not there."""
    if sel.name in PROMETHEUS_SERIES:
        for label, _, _ in sel.matchers:
            if label not in TARGET_LABELS:
                yield f"{where}: {sel.name} has no label {label!r}"
        return
    if sel.name not in scrape.samples and sel.name not in scrape.declared:
        yield f"{where}: no metric {sel.name} in /metrics"
        return
    series = scrape.samples.get(sel.name, [])
    if not series:
        return  # declared but not written yet (no hedges here): no labels to check against
    for label, op, value in sel.matchers:
        if label in TARGET_LABELS:
            continue
        written = {s[label] for s in series if label in s}
        if not written:
            yield f"{where}: {sel.name} has no label {label!r}"
            continue
        if "$" in value or not _LITERAL_ALTERNATIVES.fullmatch(value):
            continue  # a Grafana variable or a real pattern (status=~"5..")
        alternatives = value.split("|") if op in ("=~", "!~") else [value]
        for alt in alternatives:
            if alt not in written and alt not in VOCABULARY.get(label, ()):
                yield f"{where}: {sel.name}{{{label}{op}{value!r}}}: {alt!r} is never written"


@pytest.fixture
async def scrape(
    product_env: dict[str, str],
    redis_prefix: str,
    sims: Simulators,
    http: aiohttp.ClientSession,
) -> Scrape:
    """Serve the shipped gateway.yaml against the simulators, MariaDB and Redis; make a hit, a
    miss, a 404, both listings, a timeout and a breaker that opens; return the scrape."""
    loaded = product_view_config(product_env, redis_prefix)
    async with serving_config(loaded) as base:

        async def get(path: str) -> None:
            async with http.get(f"{base}{path}") as resp:
                await resp.read()

        await get("/products/1")  # miss
        await get("/products/1")  # hit
        await get("/products/0")  # not_found
        await get("/products?ids=2,3")
        await get("/categories/audio/products")
        sims.behaviour("inventory").update({"delay_ms": 250})  # its timeout_ms is 100
        await get("/products/4")
        sims.behaviour("inventory").update({"delay_ms": 0})
        sims.behaviour("pricing").update({"error_rate": 1.0})  # breaker: min_calls 20
        for i in range(10, 35):
            await get(f"/products/{i}")
        async with http.get(f"{base}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    return parse_scrape(text)


async def test_every_metric_and_label_value_the_dashboard_and_alerts_use_is_in_metrics(
    scrape: Scrape,
) -> None:
    # The run made the series the rules select on (else these checks would pass on nothing).
    outcomes = {(s["source"], s["outcome"]) for s in scrape.samples["gateway_call_outcomes_total"]}
    assert {("inventory", "timeout"), ("pricing", "error"), ("pricing", "circuit_open")} <= outcomes
    transitions = scrape.samples["gateway_breaker_transitions_total"]
    assert {"source": "pricing", "state": "open"} in transitions
    events = {s["event"] for s in scrape.samples["gateway_cache_events_total"]}
    assert {"hit", "miss"} <= events

    problems: list[str] = []
    exprs = all_exprs()
    for where, expr in exprs.items():
        found = selectors(expr)
        assert found, f"{where}: no metric found in {expr!r}"
        for sel in found:
            problems.extend(problems_of(where, sel, scrape))
    for where, (selector, label) in dashboard_variable_queries().items():
        (sel,) = selectors(selector)
        if label not in TARGET_LABELS and not any(
            label in s for s in scrape.samples.get(sel.name, [])
        ):
            problems.append(f"{where}: {sel.name} has no label {label!r}")
    assert problems == [], "\n".join(problems)


def test_a_misspelt_metric_or_label_value_is_caught() -> None:
    scrape = parse_scrape(
        "# TYPE gateway_call_outcomes counter\n"
        'gateway_call_outcomes_total{source="a",call="c",outcome="ok"} 1\n'
        "# TYPE gateway_hedges counter\n"
    )
    ok = 'sum(rate(gateway_call_outcomes_total{outcome=~"ok|stale_if_error|timeout"}[5m]))'
    assert [p for s in selectors(ok) for p in problems_of("x", s, scrape)] == [
        "x: gateway_call_outcomes_total{outcome=~'ok|stale_if_error|timeout'}: "
        "'stale_if_error' is never written"
    ]
    assert list(problems_of("x", Selector("gateway_hedges_total"), scrape)) == []
    assert list(problems_of("x", Selector("gateway_call_outcome_total"), scrape)) == [
        "x: no metric gateway_call_outcome_total in /metrics"
    ]
    wrong_label = Selector("gateway_call_outcomes_total", (("sorce", "=", "a"),))
    assert list(problems_of("x", wrong_label, scrape)) == [
        "x: gateway_call_outcomes_total has no label 'sorce'"
    ]


def test_dashboard_is_grafana_json_with_a_datasource_variable_and_unique_panel_ids() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert board["title"] and board["uid"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = list(dashboard_panels(board["panels"]))
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] >= 1, p["title"]
        area = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not area & cells, f"panel {p['title']!r} overlaps another"
        cells |= area
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        assert all(t["expr"].strip() for t in p["targets"]), p["title"]
    wanted = (
        "gateway_call_duration_seconds_bucket",
        "gateway_call_outcomes_total",
        "gateway_breaker_state",
        "gateway_cache_events_total",
        "gateway_event_loop_lag_seconds_bucket",
        "gateway_requests_total",
        "gateway_pool_in_use",
    )
    used = {s.name for e in dashboard_exprs().values() for s in selectors(e)}
    assert set(wanted) <= used
    quantiles = [
        e for e in dashboard_exprs().values() if "gateway_call_duration_seconds_bucket" in e
    ]
    assert all(
        re.search(r"histogram_quantile\(0\.\d+, sum by \(le, source\) \(rate\(", e)
        for e in quantiles
    )


def _slugs(markdown: str) -> set[str]:
    """Return the GitHub anchors of a Markdown file's headings."""
    headings = re.findall(r"^#+\s+(.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_alert_rules_are_prometheus_rules_with_for_severity_summary_and_runbook() -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    assert doc["groups"] and all(g["name"] and g["rules"] for g in doc["groups"])
    anchors = _slugs(OPERATIONS.read_text())
    names = set()
    for rule in alert_rules():
        names.add(rule["alert"])
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], rule["alert"]
        page, _, anchor = notes["runbook"].partition("#")
        assert page == "docs/operations.md" and anchor in anchors, notes["runbook"]
    assert {
        "GatewaySourceErrorRatioHigh",
        "GatewayBreakerOpen",
        "GatewaySourceTimeoutsRising",
        "GatewayCacheHitRatioCollapsed",
        "GatewayEventLoopLagging",
        "GatewayInstanceDown",
        "GatewayNoTargets",
        "GatewayP99OverDeadline",
    } <= names
    promtool = shutil.which("promtool")
    if promtool is not None:  # not installed here; checked wherever it is
        done = subprocess.run(
            [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_deadline_alerts_match_every_endpoint_deadline_of_the_shipped_config() -> None:
    loaded = config.load(ROOT / "gateway.yaml", {})
    deadlines = {f"GET {e.path}": e.deadline_ms / 1000 for e in loaded.config.endpoints}
    alerted = {}
    for rule in alert_rules():
        if rule["alert"] != "GatewayP99OverDeadline":
            continue
        (sel,) = selectors(rule["expr"])
        (endpoint,) = [v for label, op, v in sel.matchers if label == "endpoint" and op == "="]
        threshold = re.search(r">\s*([0-9.]+)\s*$", rule["expr"])
        assert threshold, rule["expr"]
        alerted[endpoint] = float(threshold.group(1))
        ms = round(alerted[endpoint] * 1000)
        assert f"{ms} ms deadline" in rule["annotations"]["summary"]
    assert alerted == deadlines
