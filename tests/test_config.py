"""The config language: the shipped example validates; every kind of mistake is located."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import loader as config
from gateway.config.schema import PropagationConfig
from gateway.config.sources import HedgeConfig
from gateway.core.errors import ConfigError
from tests.config_files import problems

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
version: 1
sources:
  catalog:
    kind: sql
    dsn: sqlite:///tmp/x.db
    timeout_ms: 100
  pricing:
    kind: http
    base_url: http://127.0.0.1:9101
    timeout_ms: 100
    headers: {Authorization: "Bearer ${PRICING_TOKEN:-dev-token}"}
endpoints:
  - path: /products/{id:int}
    deadline_ms: 300
    calls:
      product:
        source: catalog
        query: "SELECT * FROM products WHERE id = %(id)s"
        one: true
        required: true
      price:
        source: pricing
        path: /prices/{id}
        query: {category: "{product.category}"}
        fallback: null
"""


def test_shipped_gateway_yaml_is_valid_and_is_the_demo_config() -> None:
    loaded = config.load(ROOT / "gateway.yaml", env={})
    assert list(loaded.config.sources) == ["catalog", "pricing", "inventory", "reviews", "recs"]
    assert (ROOT / "gateway" / "example.yaml").read_text() == (ROOT / "gateway.yaml").read_text()


def test_good_config_loads_with_env_defaults() -> None:
    loaded = config.loads(GOOD, "gw.yaml", {})
    pricing = loaded.config.sources["pricing"]
    assert pricing.kind == "http"
    assert pricing.headers == {"Authorization": "Bearer dev-token"}


def test_env_variable_overrides_default() -> None:
    loaded = config.loads(GOOD, "gw.yaml", {"PRICING_TOKEN": "s3cr3t-value"})
    assert loaded.config.sources["pricing"].headers["Authorization"] == "Bearer s3cr3t-value"  # type: ignore[union-attr]
    assert "s3cr3t-value" not in str(loaded.redacted())


def test_misspelled_source_names_file_line_and_field() -> None:
    text = GOOD.replace("source: pricing", "source: pricng")
    assert problems(text) == [
        "gw.yaml:22: endpoints.0.calls.price.source: unknown source 'pricng' "
        "(known: catalog, pricing)"
    ]


def test_unknown_key_is_rejected_with_its_line() -> None:
    text = GOOD.replace("    timeout_ms: 100\n  pricing", "    timout_ms: 100\n  pricing")
    (problem,) = problems(text)
    assert problem.startswith("gw.yaml:6: sources.catalog.timout_ms: unknown field")


def test_missing_env_variable_without_default() -> None:
    text = GOOD.replace("${PRICING_TOKEN:-dev-token}", "${PRICING_TOKEN}")
    assert problems(text) == [
        "gw.yaml:11: sources.pricing.headers.Authorization: environment variable PRICING_TOKEN "
        "is not set and has no default"
    ]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "path: /prices/{id}",
            "path: /prices/{sku}",
            "endpoints.0.calls.price.path: template {sku} names no path parameter or call",
        ),
        (
            "deadline_ms: 300",
            "deadline_ms: 50",
            "endpoints.0.calls.product.source: timeout 100 ms is longer than the endpoint's",
        ),
        (
            "        fallback: null",
            "        fallback: null\n        required: true",
            "endpoints.0.calls.price.fallback: a required call cannot have a fallback",
        ),
        (
            "timeout_ms: 100\n  pricing",
            "timeout_ms: 1.5s\n  pricing",
            "sources.catalog.timeout_ms: Input should be a valid integer",
        ),
        ("kind: http", "kind: grpc", "sources.pricing.kind: kind must be one of: http, sql"),
        (
            "base_url: http://127.0.0.1:9101",
            "base_url: ftp://x",
            "sources.pricing.base_url: must be an http:// or https:// URL with a host",
        ),
        (
            "WHERE id = %(id)s",
            "WHERE id = %(ident)s",
            "endpoints.0.calls.product.query: placeholder %(ident)s names no path parameter",
        ),
        (
            "/products/{id:int}",
            "/products/{id:uuid}",
            "endpoints.0.path: parameter 'id' has unknown type 'uuid'",
        ),
    ],
)
def test_each_mistake_is_reported_with_its_field(old: str, new: str, expected: str) -> None:
    text = GOOD.replace(old, new)
    assert text != GOOD
    found = problems(text)
    assert any(expected in p for p in found), found
    assert all(p.startswith("gw.yaml:") and p.split(":")[1].isdigit() for p in found)


def test_cycle_between_calls_is_an_error() -> None:
    text = GOOD.replace(
        'query: "SELECT * FROM products WHERE id = %(id)s"',
        'query: "SELECT * FROM products WHERE id = %(c)s"\n        args: {c: "{price.x}"}',
    )
    found = problems(text)
    assert any("cycle" in p and "product" in p and "price" in p for p in found), found


def test_duplicate_paths_are_an_error() -> None:
    endpoint = GOOD[GOOD.index("  - path:") :]
    found = problems(
        GOOD
        + endpoint.replace("{id:int}", "{pid:int}")
        .replace("{id}", "{pid}")
        .replace("%(id)s", "%(pid)s")
    )
    assert any("duplicate path" in p for p in found), found


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/admin/{id:int}", "/docs/{id:int}"])
def test_an_endpoint_cannot_take_a_path_the_gateway_serves(path: str) -> None:
    found = problems(
        GOOD.replace("/products/{id:int}", path)
        .replace("%(id)s", "1")
        .replace("/prices/{id}", "/prices/1")
    )
    assert any("endpoints.0.path:" in p and "belongs to the gateway itself" in p for p in found), (
        found
    )


def test_every_problem_is_listed_not_just_the_first() -> None:
    text = GOOD.replace("source: pricing", "source: nope").replace(
        "deadline_ms: 300", "deadline_ms: 50"
    )
    found = problems(text)
    assert len(found) >= 2, found


def test_yaml_syntax_error_has_a_line() -> None:
    found = problems(GOOD.replace("calls:\n", "calls: [\n"))
    assert found[0].startswith("gw.yaml:") and "invalid YAML" in found[0]


def test_secret_never_appears_in_problems() -> None:
    text = GOOD.replace("timeout_ms: 100\n  pricing", "timeout_ms: nope\n  pricing").replace(
        "Bearer ${PRICING_TOKEN:-dev-token}", "${PRICING_TOKEN}"
    )
    with pytest.raises(ConfigError) as info:
        config.loads(
            text.replace("base_url: http://127.0.0.1:9101", "base_url: ${PRICING_TOKEN}"),
            "gw.yaml",
            {"PRICING_TOKEN": "hunter2-secret"},
        )
    assert "hunter2-secret" not in str(info.value)


def test_gateway_check_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("source: pricing", "source: pricng"))
    ok = subprocess.run(
        [sys.executable, "-m", "gateway", "check", str(good)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"{good}: ok: 2 sources, 1 endpoints, 2 calls"
    failed = subprocess.run(
        [sys.executable, "-m", "gateway", "check", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode == 1
    assert failed.stderr.strip() == (
        f"{bad}:22: endpoints.0.calls.price.source: unknown source 'pricng' "
        "(known: catalog, pricing)"
    )
    assert "Traceback" not in failed.stderr


# --- resilience keys: hedging and deadline propagation ---------------------------------------

PRICING_TIMEOUT = "    timeout_ms: 100\n    headers:"


def with_pricing(line: str) -> str:
    """Return GOOD with `line` added to the pricing source (as its line 11)."""
    return GOOD.replace(PRICING_TIMEOUT, f"    timeout_ms: 100\n    {line}\n    headers:")


def test_hedge_and_propagation_load_into_typed_settings() -> None:
    loaded = config.loads(with_pricing("hedge: {after: p95}"), "gw.yaml", {})
    hedge = loaded.config.sources["pricing"].hedge
    assert hedge is not None and hedge.after == "p95" and hedge.quantile == 0.95
    fixed = config.loads(with_pricing("hedge: {after_ms: 40}"), "gw.yaml", {})
    assert fixed.config.sources["pricing"].hedge == HedgeConfig(after_ms=40)
    assert loaded.config.propagation == PropagationConfig(
        request_id_header="X-Request-ID", deadline_header="X-Request-Deadline-Ms"
    )
    named = config.loads(
        "propagation: {request_id_header: X-Trace, deadline_header: X-Budget-Ms}\n" + GOOD,
        "gw.yaml",
        {},
    )
    assert named.config.propagation.request_id_header == "X-Trace"
    assert named.config.propagation.deadline_header == "X-Budget-Ms"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            with_pricing("hedge: {after_ms: 40, after: p95}"),
            "gw.yaml:11: sources.pricing.hedge: give exactly one of after_ms (a fixed delay) "
            "or after (a live latency percentile: p50, p75, p90, p95 or p99)",
        ),
        (
            with_pricing("hedge: {}"),
            "gw.yaml:11: sources.pricing.hedge: give exactly one of after_ms",
        ),
        (
            with_pricing("hedge: {after: p42}"),
            "gw.yaml:11: sources.pricing.hedge.after: Input should be 'p50', 'p75', 'p90', "
            "'p95' or 'p99'",
        ),
        (
            with_pricing("hedge: {after_ms: 0}"),
            "gw.yaml:11: sources.pricing.hedge.after_ms: Input should be greater than 0",
        ),
        (
            with_pricing("hedge: {after_ms: 100}"),
            "gw.yaml:11: sources.pricing.hedge.after_ms: 100 ms is not shorter than timeout_ms "
            "(100): the first request times out before a hedge would be sent",
        ),
        (
            GOOD.replace("    timeout_ms: 100\n  pricing", "    hedge: {after_ms: 20}\n  pricing"),
            "gw.yaml:6: sources.catalog.hedge: hedging is for http sources only: a hedged SQL "
            "query runs twice on the database and doubles its load exactly when it is slow",
        ),
        (
            "propagation: {deadline_header: X Budget}\n" + GOOD,
            "gw.yaml:1: propagation.deadline_header: 'X Budget' is not a valid HTTP header name",
        ),
        (
            "propagation: {request_id_header: X-Id, deadline_header: x-id}\n" + GOOD,
            "gw.yaml:1: propagation: request_id_header and deadline_header must be different",
        ),
        (
            "propagation: {request_id: X-Id}\n" + GOOD,
            "gw.yaml:1: propagation.request_id: unknown field",
        ),
    ],
    ids=[
        "hedge-both",
        "hedge-neither",
        "hedge-unknown-percentile",
        "hedge-zero",
        "hedge-after-timeout",
        "hedge-on-sql",
        "bad-header-name",
        "same-header-twice",
        "unknown-propagation-key",
    ],
)
def test_resilience_key_mistakes_are_located(text: str, expected: str) -> None:
    found = problems(text)
    assert any(p.startswith(expected) for p in found), found
