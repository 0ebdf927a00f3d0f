"""The composite-response cache: ready bytes under keys and tags, in memory or in Redis."""

from cache.composite import CachePolicy, CompositeCache, Lookup, open_cache
from cache.entry import Entry, decode, encode, make_entry
from cache.keys import composite_key
from cache.store import CacheUnavailable, Store

__all__ = [
    "CachePolicy",
    "CacheUnavailable",
    "CompositeCache",
    "Entry",
    "Lookup",
    "Store",
    "composite_key",
    "decode",
    "encode",
    "make_entry",
    "open_cache",
]
