"""Optional extras: a config that needs one that is not installed says what to install, at its
line, instead of failing at the first request."""

from __future__ import annotations

import pytest

from gateway.config import kinds
from gateway.config import loader as config
from gateway.core.errors import ConfigError

TEXT = """\
version: 1
sources:
  pricing:
    kind: http
    base_url: http://127.0.0.1:9101
    client: httpx
endpoints:
  - path: /p/{id:int}
    calls:
      price: {source: pricing, path: "/prices/{id}"}
"""


def test_client_httpx_without_the_httpx_extra_is_a_located_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kinds, "httpx_installed", lambda: False)
    with pytest.raises(ConfigError) as info:
        config.loads(TEXT, "gw.yaml", {})
    (problem,) = [str(p) for p in info.value.problems]
    assert problem.startswith("gw.yaml:") and "sources.pricing" in problem, problem
    assert "pip install '.[httpx]'" in problem


def test_client_httpx_with_the_extra_loads() -> None:
    assert kinds.httpx_installed()
    config.loads(TEXT, "gw.yaml", {})


def test_the_aiohttp_client_never_imports_httpx() -> None:
    import subprocess
    import sys

    code = (
        "import sys, asyncio\n"
        "from upstreams.http import HttpSettings, http_source\n"
        "async def main():\n"
        "    up = await http_source('s', HttpSettings(base_url='http://127.0.0.1:9'))\n"
        "    await up.close()\n"
        "asyncio.run(main())\n"
        "assert 'httpx' not in sys.modules, 'httpx was imported'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
