"""`gateway test`: contract files run against scripted upstreams, through the real command."""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = ROOT / "tests" / "contracts"


def gateway_test(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `gateway test ARGS` in a fresh process from the repository's root."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", "test", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


LAMP = "{rows: [{id: 42, sku: SKU-42, name: Lamp, brand: Acme, category: lights}]}"
OTHERS = """
      inventory: {json: {available: 3}}
      reviews: {json: {average: 4.5, count: 2, top: []}}
      recs: {json: {product_ids: [7]}}"""


def test_the_shipped_contracts_pass() -> None:
    done = gateway_test("gateway.yaml", "tests/contracts/")
    cases = sum(len(yaml.safe_load(f.read_text())["cases"]) for f in CONTRACTS.glob("*.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == f"{cases} passed, 0 failed"
    assert len([x for x in lines if re.fullmatch(r"PASS /\S+ :: .+ \(\d+ ms\)", x)]) == cases


def test_a_failing_case_prints_where_the_answer_differs_and_exits_1(tmp_path: Path) -> None:
    contract = tmp_path / "product.yaml"
    contract.write_text(f"""endpoint: /products/{{id:int}}
cases:
  - name: pricing down
    request: {{path: /products/42}}
    upstreams:
      catalog: {LAMP}
      pricing: {{status: 503}}{OTHERS}
    expect:
      status: 200
      headers: {{X-Gateway-Complete: true}}
      json: {{product: {{name: Lamp}}, price: {{currency: USD, amount: 19.5}}}}
  - name: pricing up
    request: {{path: /products/42}}
    upstreams:
      catalog: {LAMP}
      pricing: {{json: {{currency: EUR, amount: 19.5, discount: 0}}}}{OTHERS}
    expect:
      status: 200
      json: {{price: {{currency: EUR, amount: 19.5}}, _meta: {{complete: true}}}}
""")
    done = gateway_test("gateway.yaml", str(contract))
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert re.search(r"^FAIL /products/\{id:int\} :: pricing down \(\d+ ms\)$", out, re.M)
    assert '    header X-Gateway-Complete: expected "true", got "false"\n' in out
    assert "    json.price.amount: expected 19.5, got null\n" in out
    assert '    answer: {"product":{"id":42,' in out
    # The second case runs on a gateway of its own: the first one's answer is not in its cache.
    assert re.search(r"^PASS /products/\{id:int\} :: pricing up \(\d+ ms\)$", out, re.M)
    assert out.splitlines()[-1] == "1 passed, 1 failed"


def test_upstreams_that_get_more_requests_or_other_ones_than_scripted_fail_the_case(
    tmp_path: Path,
) -> None:
    contract = tmp_path / "product.yaml"
    contract.write_text(f"""endpoint: /products/{{id:int}}
cases:
  - name: a retry nobody scripted, a wrong query, a header not sent
    request: {{path: /products/42}}
    upstreams:
      catalog: {LAMP}
      pricing: [{{status: 503, expect: {{headers: {{Authorization: Bearer prod}}}}}}]
      inventory: {{json: {{available: 3}}}}
      reviews: {{json: {{}}}}
      recs: {{json: {{product_ids: []}}, expect: {{query: {{category: lamps}}}}}}
    expect:
      status: 200
""")
    done = gateway_test("gateway.yaml", str(contract))
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert '    pricing: request 1: header Authorization: expected "Bearer prod", got ' in out
    assert "    pricing: 2 requests, 1 scripted answer\n" in out
    assert '    recs: request 1: query category: expected "lamps", got "lights"\n' in out
    assert out.splitlines()[-1] == "0 passed, 1 failed"


def test_a_scripted_answer_that_expects_a_request_fails_when_none_comes(tmp_path: Path) -> None:
    contract = tmp_path / "product.yaml"
    contract.write_text("""endpoint: /products/{id:int}
cases:
  - name: no such product
    request: {path: /products/7}
    upstreams:
      catalog: {rows: []}
      pricing: {json: {}}
      inventory: {json: {}}
      reviews: {json: {}}
      recs: {json: {}, expect: {path: /recommendations/7}}
    expect:
      status: 404
""")
    done = gateway_test("gateway.yaml", str(contract))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "    recs: its answer expects a request; none came\n" in done.stdout


def test_bad_contract_files_are_listed_by_line_and_nothing_runs(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    text = (ROOT / "gateway.yaml").read_text()
    config.write_text(
        text.replace(
            "\nendpoints:\n",
            "\n  search: {kind: http, base_url: 'http://127.0.0.1:9', timeout_ms: 100}"
            "\nendpoints:\n"
            "  - path: /search/{q}\n"
            "    calls: {hits: {source: search, path: '/q/{q}'}}\n",
            1,
        )
    )
    (tmp_path / "a.yaml").write_text(
        """endpoint: /products/{id:int}
cases:
  - name: bad
    request: {path: /products/42}
    upstreams:
      catalog: {json: {id: 42}}
      pricing: {status: ok}
      warehouse: {json: {}}
      search: {json: {}}
    expect: {status: 200, colour: blue}
  - name: wrong path
    request: {path: /search/lamps}
    expect: {status: 200}
"""
    )
    (tmp_path / "b.yaml").write_text(
        "endpoint: /products/{id}\ncases: [{name: x, request: {path: /products/1}, "
        "expect: {status: 200}}]\n"
    )
    (tmp_path / "c.yaml").write_text("endpoint: /search/{q}\ncases: [{name: x\n")
    done = gateway_test(
        str(config), str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml"), str(tmp_path / "c.yaml")
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    a, b, c = (str(tmp_path / n) for n in ("a.yaml", "b.yaml", "c.yaml"))
    problems = done.stderr.splitlines()
    assert (
        f"{a}:6: cases.0.upstreams.catalog.json: unknown field (catalog is a sql source)"
        in problems
    )
    assert (
        f"{a}:7: cases.0.upstreams.pricing.status: Input should be a valid integer, "
        "unable to parse string as an integer" in problems
    )
    assert (
        f"{a}:8: cases.0.upstreams.warehouse: unknown source warehouse "
        "(sources: catalog, pricing, inventory, reviews, recs, search)" in problems
    )
    assert (
        f"{a}:9: cases.0.upstreams.search: no call of /products/{{id:int}} uses source "
        "search: this script can never be consumed" in problems
    )
    assert f"{a}:10: cases.0.expect.colour: unknown field" in problems
    assert (
        f"{a}:12: cases.1.request.path: /search/lamps is not a path of /products/{{id:int}}"
        in problems
    )
    assert any(
        p.startswith(f"{b}:1: endpoint: no endpoint /products/{{id}} in the config")
        for p in problems
    )
    # The end of the stream is reported on the file's last line, as for gateway.yaml itself.
    assert any(p.startswith(f"{c}:2: (yaml): invalid YAML: ") for p in problems)
    assert len(problems) == 8, problems


def test_junit_has_one_testcase_per_case_with_the_failure_text(tmp_path: Path) -> None:
    contract = tmp_path / "product.yaml"
    contract.write_text(f"""endpoint: /products/{{id:int}}
cases:
  - name: complete
    request: {{path: /products/42}}
    upstreams:
      catalog: {LAMP}
      pricing: {{json: {{currency: EUR, amount: 1, discount: 0}}}}{OTHERS}
    expect: {{status: 200, json: {{_meta: {{complete: true}}}}}}
  - name: wrong status
    request: {{path: /products/42}}
    upstreams:
      catalog: {{rows: []}}
      pricing: {{json: {{}}}}{OTHERS}
    expect: {{status: 200}}
""")
    report = tmp_path / "junit.xml"
    done = gateway_test("gateway.yaml", str(contract), "--junit", str(report))
    assert done.returncode == 1, done.stdout + done.stderr
    root = ET.parse(report).getroot()
    assert (root.tag, root.get("tests"), root.get("failures")) == ("testsuites", "2", "1")
    cases = root.findall("./testsuite/testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [
        ("/products/{id:int}", "complete"),
        ("/products/{id:int}", "wrong status"),
    ]
    assert cases[0].find("failure") is None
    failure = cases[1].find("failure")
    assert failure is not None
    assert failure.get("message") == "status: expected 200, got 404"
    assert failure.text is not None and '"outcome":"not_found"' in failure.text


def test_an_alias_bomb_in_a_contract_file_is_refused_at_once(tmp_path: Path) -> None:
    # Each line multiplies the nodes by 10: expanded, this is 10^7 values (minutes of work).
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 7):
        levels.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\nendpoint: /products/{id:int}\ncases: *a6\n")
    run = gateway_test("gateway.yaml", str(bomb))
    assert run.returncode == 2, run
    assert "too large once aliases expand" in run.stderr + run.stdout
