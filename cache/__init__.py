"""The composite-response cache: ready bytes under keys and tags, in memory or in Redis."""

from cache.composite import CompositeCache, Lookup, open_cache
from cache.entry import Entry, decode, encode, make_entry
from cache.keys import composite_key
from cache.policy import CachePolicy, CacheSettings, NearSettings
from cache.store import CacheUnavailable, Store

__all__ = [
    "CachePolicy",
    "CacheSettings",
    "CacheUnavailable",
    "CompositeCache",
    "Entry",
    "Lookup",
    "NearSettings",
    "Store",
    "composite_key",
    "decode",
    "encode",
    "make_entry",
    "open_cache",
]
