"""The products table shared by the demo, the tests and the bench, with deterministic rows."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomysql

SCHEMA = """CREATE TABLE IF NOT EXISTS products (
    id INT PRIMARY KEY,
    sku VARCHAR(32) NOT NULL,
    name VARCHAR(200) NOT NULL,
    brand VARCHAR(100) NOT NULL,
    category VARCHAR(50) NOT NULL,
    price DECIMAL(10,2) NOT NULL,
    created_at DATETIME NOT NULL
)"""
"""DDL of the products table, valid for both MariaDB/MySQL and SQLite."""

INDEX = "CREATE INDEX IF NOT EXISTS products_by_category ON products (category, id)"
"""The index a category listing reads (`WHERE category = ... ORDER BY id`), valid for both."""

CATEGORIES = ("books", "electronics", "garden", "home", "sports", "toys")
BRANDS = ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark")
_NOUNS = ("Lamp", "Kettle", "Backpack", "Novel", "Drone", "Chair", "Puzzle", "Racket")
_EPOCH = datetime(2020, 1, 1)
_COLUMNS = "products (id, sku, name, brand, category, price, created_at)"
_BATCH = 1000


def row(product_id: int) -> tuple[int, str, str, str, str, Decimal, datetime]:
    """Return the products row of one id: (id, sku, name, brand, category, price, created_at)."""
    h = (product_id * 2654435761) & 0xFFFFFFFF
    return (
        product_id,
        f"SKU-{product_id}",
        f"{_NOUNS[h % len(_NOUNS)]} {product_id}",
        BRANDS[(h >> 3) % len(BRANDS)],
        CATEGORIES[product_id % len(CATEGORIES)],
        Decimal(100 + h % 100_000) / 100,
        _EPOCH + timedelta(minutes=product_id * 37),
    )


def seed_sqlite(path: str, count: int = 10_000) -> None:
    """Create the products table in a SQLite file if missing and fill ids 1..count if short."""
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute(SCHEMA)
            conn.execute(INDEX)
            (have,) = conn.execute("SELECT COUNT(*) FROM products").fetchone()
            if have >= count:
                return
            # sqlite3 has no Decimal adapter and its datetime one is deprecated: pass text.
            conn.executemany(
                f"INSERT OR IGNORE INTO {_COLUMNS} VALUES ({', '.join('?' * 7)})",
                (_as_text(row(i)) for i in range(1, count + 1)),
            )
    finally:
        conn.close()


def _as_text(r: tuple[Any, ...]) -> tuple[Any, ...]:
    return (*r[:5], str(r[5]), r[6].strftime("%Y-%m-%d %H:%M:%S"))


async def seed_mysql(dsn: str, count: int = 10_000) -> None:
    """Create the database and table behind a mysql:// DSN if missing and fill ids 1..count."""
    parts = urlsplit(dsn)
    database = parts.path.lstrip("/")
    if not database:
        raise ValueError("the DSN needs a database name: mysql://user:pass@host:port/db")
    conn = await aiomysql.connect(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 3306,
        user=unquote(parts.username or "root"),
        password=unquote(parts.password or ""),
        autocommit=False,
    )
    try:
        async with conn.cursor() as cur:
            # Asked first rather than IF NOT EXISTS: aiomysql turns that note into a warning.
            await cur.execute(
                "SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name = %s",
                (database,),
            )
            if (await cur.fetchone()) == (0,):
                await cur.execute(f"CREATE DATABASE `{database}`")
            await cur.execute(f"USE `{database}`")
            await cur.execute(
                "SELECT COUNT(*) FROM information_schema.tables "
                "WHERE table_schema = %s AND table_name = 'products'",
                (database,),
            )
            if (await cur.fetchone()) == (0,):
                await cur.execute(SCHEMA)
                await cur.execute(INDEX)
            await cur.execute("SELECT COUNT(*) FROM products")
            (have,) = await cur.fetchone()
            if have >= count:
                return
            # Not INSERT IGNORE: its skipped duplicates come back as Python warnings.
            insert = (
                f"INSERT INTO {_COLUMNS} VALUES ({', '.join(['%s'] * 7)})"
                " ON DUPLICATE KEY UPDATE id = id"
            )
            for start in range(1, count + 1, _BATCH):
                # aiomysql turns one executemany of an INSERT into a single multi-row statement.
                await cur.executemany(
                    insert, [row(i) for i in range(start, min(start + _BATCH, count + 1))]
                )
        await conn.commit()
    finally:
        conn.close()
