"""The simulated services' batch routes: many ids in one request, served like the single route."""

from __future__ import annotations

import time

import aiohttp
import orjson
import pytest
from yarl import URL

from gateway.demo.simulator import MAX_BATCH, Simulators, price_body

# `sims` and `http` are tests/conftest.py's fixtures.

SINGLE = {
    "pricing": "/prices/{}",
    "inventory": "/stock/{}",
    "reviews": "/products/{}/reviews",
    "recs": "/recommendations/{}?category=toys",
}
BATCH = {
    "pricing": "/prices?ids={}",
    "inventory": "/stock?ids={}",
    "reviews": "/reviews?ids={}",
    "recs": "/recommendations?ids={}&category=toys",
}


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    # encoded=True: the target goes out exactly as written, percent escapes and all.
    async with http.get(URL(url, encoded=True)) as resp:
        return resp.status, await resp.read()


async def _batch_ids(http: aiohttp.ClientSession, sims: Simulators, ids: str) -> list[int]:
    status, body = await _get(http, sims.urls["pricing"] + BATCH["pricing"].format(ids))
    assert status == 200
    return [element["product_id"] for element in orjson.loads(body)]


@pytest.mark.parametrize("service", sorted(SINGLE))
async def test_batch_elements_are_the_single_bodies_plus_product_id(
    sims: Simulators, http: aiohttp.ClientSession, service: str
):
    ids = [42, 7, 1_000_000]
    status, body = await _get(
        http, sims.urls[service] + BATCH[service].format(",".join(map(str, ids)))
    )
    assert status == 200
    expected = []
    for product_id in ids:
        single = sims.urls[service] + SINGLE[service].format(product_id)
        single_status, single_body = await _get(http, single)
        assert single_status == 200
        expected.append({**orjson.loads(single_body), "product_id": product_id})
    assert orjson.loads(body) == expected


async def test_recs_batch_uses_the_category_for_every_id(
    sims: Simulators, http: aiohttp.ClientSession
):
    status, body = await _get(http, f"{sims.urls['recs']}/recommendations?ids=1,2&category=home")
    assert status == 200
    assert [e["category"] for e in orjson.loads(body)] == ["home", "home"]


async def test_unknown_and_malformed_ids_are_omitted_never_an_error(
    sims: Simulators, http: aiohttp.ClientSession
):
    bad = ["0", "abc", "-1", "1.5", "", "1000001", "99999999", "%C2%B2", "%D9%A1%D9%A2", "1%202"]
    got = await _batch_ids(http, sims, ",".join(["3", *bad, "1000000"]))
    assert got == [3, 1_000_000]
    assert await _batch_ids(http, sims, ",".join(bad)) == []
    assert await _batch_ids(http, sims, "") == []


async def test_answer_follows_the_id_order_and_answers_duplicates_once(
    sims: Simulators, http: aiohttp.ClientSession
):
    assert await _batch_ids(http, sims, "5,3,5,1,3,0003") == [5, 3, 1]


async def test_a_batch_request_counts_as_one_request(sims: Simulators, http: aiohttp.ClientSession):
    await _batch_ids(http, sims, ",".join(str(i) for i in range(1, 25)))
    status, _ = await _get(http, f"{sims.urls['reviews']}/reviews?ids=1,2,3")
    assert status == 200
    assert sims.counts() == {"pricing": 1, "inventory": 0, "reviews": 1, "recs": 0}


async def test_error_rate_one_makes_a_batch_503_counted_once(
    sims: Simulators, http: aiohttp.ClientSession
):
    sims.behaviour("inventory").error_rate = 1
    status, body = await _get(http, f"{sims.urls['inventory']}/stock?ids=1,2,3")
    assert (status, orjson.loads(body)) == (503, {"error": "unavailable"})
    assert sims.services["inventory"].stats()["requests"] == 1
    assert sims.services["inventory"].stats()["errors"] == 1


async def test_delay_applies_once_per_batch_not_per_id(
    sims: Simulators, http: aiohttp.ClientSession
):
    sims.behaviour("pricing").delay_ms = 200
    started = time.monotonic()
    assert len(await _batch_ids(http, sims, ",".join(str(i) for i in range(1, 51)))) == 50
    # Per id it would take 10 s; once per batch, 0.2 s.
    assert 0.19 <= time.monotonic() - started < 5


async def test_hang_rate_one_hangs_a_batch_once(sims: Simulators, http: aiohttp.ClientSession):
    sims.behaviour("recs").hang_rate = 1
    with pytest.raises(TimeoutError):
        async with http.get(
            f"{sims.urls['recs']}/recommendations?ids=1,2",
            timeout=aiohttp.ClientTimeout(total=0.3),
        ):
            pass
    assert sims.services["recs"].stats()["hangs"] == 1


async def test_more_than_max_batch_ids_or_no_ids_is_a_400_that_does_not_count(
    sims: Simulators, http: aiohttp.ClientSession
):
    url = sims.urls["pricing"]
    too_many = ",".join(["1"] * (MAX_BATCH + 1))
    for target in (f"/prices?ids={too_many}", "/prices", "/prices?", "/prices?id=1"):
        status, body = await _get(http, url + target)
        assert status == 400, target
        assert "error" in orjson.loads(body)
    assert sims.counts()["pricing"] == 0
    at_most = ",".join(str(i) for i in range(1, MAX_BATCH + 1))
    assert await _batch_ids(http, sims, at_most) == list(range(1, MAX_BATCH + 1))


async def test_single_routes_answer_as_before_beside_the_batch_routes(
    sims: Simulators, http: aiohttp.ClientSession
):
    url = sims.urls["pricing"]
    assert await _get(http, f"{url}/prices/42") == (200, price_body(42))
    assert await _get(http, f"{url}/prices/42?ids=1,2") == (200, price_body(42))
    not_found = orjson.dumps({"error": "not_found"})
    for target in ("/prices/", "/prices/?ids=1", "/prices/0", "/pricesx?ids=1", "/prices/1/x"):
        assert await _get(http, url + target) == (404, not_found), target
    status, body = await _get(http, f"{sims.urls['reviews']}/products/42/reviews")
    assert status == 200 and "product_id" not in orjson.loads(body)


@pytest.mark.parametrize("product_id", ["%C2%B2", "%D9%A1%D9%A2"])
async def test_single_route_takes_ascii_digits_only(
    sims: Simulators, http: aiohttp.ClientSession, product_id: str
):
    # "²" once crashed the handler (500) and "١٢" answered as id 12.
    status, body = await _get(http, f"{sims.urls['pricing']}/prices/{product_id}")
    assert (status, orjson.loads(body)) == (404, {"error": "not_found"})


async def test_batch_routes_answer_get_only(sims: Simulators, http: aiohttp.ClientSession):
    async with http.post(f"{sims.urls['pricing']}/prices?ids=1") as resp:
        assert resp.status == 405
    assert sims.counts()["pricing"] == 0
