"""`gateway demo`, as a newcomer runs it: a subprocess that serves the product view at once."""

from __future__ import annotations

import asyncio
import signal

import aiohttp

from tests.config_files import start_demo, wait_healthy
from tests.support import free_port

TOKEN = "demo-admin-token"


async def test_demo_serves_the_complete_product_view_reloads_and_stops_cleanly(
    http: aiohttp.ClientSession,
) -> None:
    port = free_port()
    proc = await start_demo(port, GATEWAY_ADMIN_TOKEN=TOKEN, GATEWAY_LOG_LEVEL="warning")
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(base, proc, None, within_s=30)
        async with http.get(f"{base}/products/42") as resp:
            assert resp.status == 200
            doc = await resp.json()
        assert doc["_meta"] == {"complete": True, "sources": {}}
        assert doc["product"]["id"] == 42 and doc["product"]["sku"] == "SKU-42"
        assert set(doc) == {"product", "price", "stock", "reviews", "recommendations", "_meta"}
        # A reload reads gateway.yaml again: it must still point at the demo's own services.
        async with http.post(
            f"{base}/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as resp:
            assert resp.status == 200, await resp.text()
        async with http.get(f"{base}/products/43") as resp:
            assert (await resp.json())["_meta"]["complete"] is True
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        out_b, err_b = await asyncio.wait_for(proc.communicate(), 20)
        out, err = out_b.decode(), err_b.decode()
    assert proc.returncode == 0, err
    assert f"curl -i {base}/products/42" in out
    assert "Traceback" not in err
