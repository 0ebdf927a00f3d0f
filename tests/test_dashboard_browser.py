"""The dashboard in headless Chromium: it loads, shows every source of the config, and is
photographed to test-artifacts/dashboard.png."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from gateway.app import create_app
from gateway.demo.simulator import Simulators
from tests.config_files import config_text, write_config
from tests.serving import serving

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = "bash scripts/install-browser.sh  (apt-get install -y chromium chromium-driver)"
TOKEN = "dashboard-admin-token"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
SOURCES = {"catalog", "pricing", "inventory", "reviews", "recs"}


def chromium(profile: str) -> webdriver.Chrome:
    """Return a headless Chromium with a fresh profile that calls nowhere but where it is sent."""
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not os.access(binary, os.X_OK):
            pytest.fail(f"{binary} is missing; install it with: {INSTALL}", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1100",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


async def test_dashboard_shows_every_source_of_the_config(
    sims: Simulators,
    redis_prefix: str,
    tmp_path: Path,
    served_env: Callable[..., dict[str, str]],
) -> None:
    served_env(TOKEN)
    path = write_config(tmp_path, config_text(redis_prefix))
    sims.behaviour("reviews").update({"delay_ms": 20, "jitter_ms": 30})
    sims.behaviour("recs").update({"error_rate": 1.0})  # optional: answers stay 200
    async with serving(create_app(str(path))) as base:
        async with aiohttp.ClientSession() as http:
            for i in range(1, 121):
                async with http.get(f"{base}/products/{i % 90 + 1}") as resp:
                    assert resp.status == 200
        profile = tempfile.mkdtemp(prefix="gateway-chromium-")
        driver = await asyncio.to_thread(chromium, profile)
        try:
            await asyncio.to_thread(
                driver.get, f"{base}/admin/dashboard?token={TOKEN}&every_ms=500"
            )
            shown: set[str] = set()
            for _ in range(100):  # the page polls every 0.5 s: wait until it has drawn twice
                loaded = await asyncio.to_thread(
                    driver.execute_script, "return document.body.dataset.loaded"
                )
                tiles = await asyncio.to_thread(
                    driver.find_elements, By.CSS_SELECTOR, ".tile.source"
                )
                shown = {t.get_attribute("data-source") or "" for t in tiles}
                if loaded == "true" and shown == SOURCES:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.2)
            status = driver.find_element(By.ID, "status").text
            assert status.startswith("updated"), status
            assert shown == SOURCES
            pricing = driver.find_element(By.ID, "source-pricing").text
            assert "breaker closed" in pricing and "p50 / p95 / p99" in pricing
            assert "no failed calls" in pricing
            recs = driver.find_element(By.ID, "source-recs").text
            assert "why calls failed" in recs and "HTTP 503" in recs, recs
            assert "polyline" in driver.find_element(By.ID, "source-reviews").get_attribute(
                "innerHTML"
            )
            assert "%" in driver.find_element(By.ID, "cache-ratio").text
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "dashboard.png"
            assert await asyncio.to_thread(driver.save_screenshot, str(shot))
            assert shot.stat().st_size > 10_000
            # Explain a request by its path: the answer's _explain, with the page's token.
            field = driver.find_element(By.ID, "explain-url")
            await asyncio.to_thread(field.send_keys, "/products/42")
            await asyncio.to_thread(
                driver.find_element(By.CSS_SELECTOR, "#explain-form button").click
            )
            out = driver.find_element(By.ID, "explain-out")
            for _ in range(100):
                if out.get_attribute("data-done") == "true":
                    break
                await asyncio.sleep(0.1)
            text = out.text
            assert text.startswith("HTTP 200"), text
            assert '"cache"' in text and '"budget"' in text and '"trace_id"' in text, text
            # A "path" that names another host never gets the page's token.
            await asyncio.to_thread(field.clear)
            await asyncio.to_thread(field.send_keys, "/\\evil.example/products/42")
            await asyncio.to_thread(
                driver.find_element(By.CSS_SELECTOR, "#explain-form button").click
            )
            await asyncio.sleep(0.3)
            assert out.text == "give a path of this gateway, starting with /", out.text
        finally:
            await asyncio.to_thread(driver.quit)
            shutil.rmtree(profile, ignore_errors=True)
