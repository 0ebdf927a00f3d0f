"""aiomysql against asyncmy on the gateway's catalog query: CPU per query, same pool, same load.

Measurement only (issue 11): asyncmy is not a dependency. Needs MariaDB seeded by bench/run.py
(`gwbench`) and `pip install asyncmy` in the venv.

    python bench/sql_drivers.py [--queries 20000] [--concurrency 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

SQL = "SELECT id, sku, name, brand, category FROM products WHERE id = %(id)s"
OPTIONS = {"host": "127.0.0.1", "port": 3306, "user": "root", "db": "gwbench", "autocommit": True}


async def run(driver: str, queries: int, concurrency: int) -> float:
    """Return CPU microseconds per query for `driver` (aiomysql or asyncmy)."""
    if driver == "aiomysql":
        import aiomysql as mod

        cursor: Any = mod.DictCursor
    else:
        import asyncmy as mod  # type: ignore[no-redef]
        from asyncmy.cursors import DictCursor as cursor

    pool = await mod.create_pool(minsize=concurrency, maxsize=concurrency, **OPTIONS)

    async def worker(k: int, n: int) -> None:
        for i in range(k, n, concurrency):
            async with pool.acquire() as conn:
                async with conn.cursor(cursor) as cur:
                    await cur.execute(SQL, {"id": i % 10_000 + 1})
                    rows = await cur.fetchall()
                    assert len(rows) == 1

    await asyncio.gather(*(worker(k, 2000) for k in range(concurrency)))  # warm-up
    t0 = time.process_time()
    await asyncio.gather(*(worker(k, queries) for k in range(concurrency)))
    cpu = time.process_time() - t0
    pool.close()
    await pool.wait_closed()
    return cpu / queries * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import uvloop

    for r in range(args.rounds):
        for driver in ("aiomysql", "asyncmy") if r % 2 == 0 else ("asyncmy", "aiomysql"):
            us = uvloop.run(run(driver, args.queries, args.concurrency))
            print(f"{driver}: {us:.1f} us CPU per query", flush=True)


if __name__ == "__main__":
    main()
