"""A cached composite answer and its byte codec: a small header, then the body (zlib if large)."""

from __future__ import annotations

import math
import re
import struct
import time
import zlib
from dataclasses import dataclass
from hashlib import blake2b

from cache.directives import Directives

COMPRESS_MIN_BYTES = 4096
"""Bodies at least this long are stored zlib-compressed, unless the caller says otherwise."""

MAX_BODY_BYTES = 8 * 1024 * 1024
"""The longest body stored or read back, unless the caller says otherwise (`cache.max_entry_bytes`).

A stored entry is only data from Redis: one that inflates past this is refused as it inflates,
so a hostile 300 KB value that would become 300 MB costs no more than this."""

Windows = tuple[float, float, float, float]
"""How old a complete, a partial and a not-found entry may be and still be served without a
fan-out, and the stale-while-revalidate seconds within them (`CachePolicy.windows`)."""

# magic, version, flags, status, written_at, max-age cap (NO_CAP: none), etag length; then the
# etag, then the body. Version 1 had no cap; its entries are still read (as uncapped).
_ETAG = re.compile(r'"[0-9a-f]{32}"')
_HEADER = struct.Struct(">2sBBHdIB")
_HEADER_V1 = struct.Struct(">2sBBHdB")
_MAGIC = b"GW"
_VERSION = 2
NO_CAP = 0xFFFFFFFF
_COMPLETE = 0x01
_ZLIB = 0x02
_INFLATE_STEP = 256 * 1024


@dataclass(frozen=True, slots=True)
class Entry:
    """One composite answer as it is sent: status, encoded JSON body, completeness, age and ETag,
    and what its upstreams' `Cache-Control` allows (`cache.directives`): an entry that says
    `no_store` or `private` is never stored, and one is fresh at most `max_age_s`."""

    status: int
    body: bytes
    complete: bool
    written_at: float
    etag: str
    max_age_s: float = math.inf
    no_store: bool = False
    private: bool = False

    @property
    def shared(self) -> bool:
        """Whether a shared cache (the gateway's, a CDN's) may store this answer."""
        return not (self.no_store or self.private)


class CorruptEntry(ValueError):
    """Stored bytes are not an entry this codec wrote (another version, truncated, garbage)."""


def make_entry(
    status: int, body: bytes, complete: bool, directives: Directives | None = None
) -> Entry:
    """Return an entry stamped with the current time and a strong ETag over `body`, bound by
    its upstreams' `directives`, if any."""
    if directives is None:
        return Entry(status, body, complete, time.time(), etag_of(body))
    return Entry(
        status,
        body,
        complete,
        time.time(),
        etag_of(body),
        directives.max_age_s,
        directives.no_store,
        directives.private,
    )


def etag_of(body: bytes) -> str:
    """Return the strong ETag (quoted 128-bit BLAKE2b hex digest) of a body."""
    return '"' + blake2b(body, digest_size=16).hexdigest() + '"'


def stored_limit(max_body_bytes: int = MAX_BODY_BYTES) -> int:
    """Return the longest stored form of an entry whose body is at most `max_body_bytes` long."""
    return _HEADER.size + 255 + max_body_bytes  # the ETag's length is one byte


def encode(entry: Entry, compress_min_bytes: int = COMPRESS_MIN_BYTES) -> bytes:
    """Return the stored form of an entry; the body is compressed when it is long and shrinks.

    Raises ValueError for an entry that no shared cache may store (`Entry.shared`)."""
    if not entry.shared:
        raise ValueError("an entry that says no-store or private is never stored")
    flags = _COMPLETE if entry.complete else 0
    body = entry.body
    if len(body) >= compress_min_bytes:
        packed = zlib.compress(body, 1)
        # Already-dense bodies can grow; storing them raw keeps hits free of a pointless inflate.
        if len(packed) < len(body):
            body, flags = packed, flags | _ZLIB
    etag = entry.etag.encode("ascii")
    cap = NO_CAP if entry.max_age_s >= NO_CAP else int(entry.max_age_s)
    header = _HEADER.pack(_MAGIC, _VERSION, flags, entry.status, entry.written_at, cap, len(etag))
    return b"".join((header, etag, body))


def decode(data: bytes, max_body_bytes: int = MAX_BODY_BYTES) -> Entry:
    """Return the entry stored in `data` without parsing its JSON; raise `CorruptEntry` if bad,
    or as soon as its body is (or inflates to) more than `max_body_bytes`."""
    try:
        magic, _, flags, status, written_at, cap, etag_len, size = _header(data)
    except struct.error:
        raise CorruptEntry("shorter than an entry header") from None
    if magic != _MAGIC:
        raise CorruptEntry(f"not an entry of codec version {_VERSION}")
    start = size + etag_len
    if len(data) < start:
        raise CorruptEntry("truncated ETag")
    etag = data[size:start].decode("ascii", "replace")
    # Both go out as they are (status line, ETag header): only what `make_entry` writes passes.
    if not 100 <= status <= 599 or not _ETAG.fullmatch(etag):
        raise CorruptEntry("not a status and ETag this gateway writes")
    # Stored bodies are only compressed when that shrinks them: no honest one is longer packed.
    if len(data) - start > max_body_bytes:
        raise CorruptEntry(f"body over {max_body_bytes} bytes")
    body = data[start:]
    if flags & _ZLIB:
        body = _inflate(body, max_body_bytes)
    max_age = math.inf if cap == NO_CAP else float(cap)
    return Entry(status, body, bool(flags & _COMPLETE), written_at, etag, max_age)


def _header(data: bytes) -> tuple[bytes, int, int, int, float, int, int, int]:
    """Return an entry's header fields (a version 1 entry's cap is NO_CAP) and the header's size;
    the magic is b"" for an unknown version. Raises `struct.error` when `data` is too short."""
    version = data[2] if len(data) > 2 else 0
    if version == _VERSION:
        magic, version, flags, status, written_at, cap, etag_len = _HEADER.unpack_from(data)
        return magic, version, flags, status, written_at, cap, etag_len, _HEADER.size
    if version == 1:
        magic, version, flags, status, written_at, etag_len = _HEADER_V1.unpack_from(data)
        return magic, version, flags, status, written_at, NO_CAP, etag_len, _HEADER_V1.size
    if len(data) < _HEADER_V1.size:
        raise struct.error("shorter than an entry header")
    return b"", version, 0, 0, 0.0, NO_CAP, 0, 0


def servable(data: bytes, windows: Windows, now: float) -> bool:
    """Return whether the entry stored in `data` is young enough at `now` to be served without a
    fan-out: `windows` are the ages allowed for complete, partial and not-found entries, and the
    stale seconds within the first two; an entry's max-age cap shortens them (the same test the
    Redis lookup script makes, so that both always agree)."""
    try:
        magic, _, flags, status, written_at, cap, _, _ = _header(data)
    except struct.error:
        return False
    if magic != _MAGIC:
        return False
    if status == 200:
        window = windows[0] if flags & _COMPLETE else windows[1]
        if cap != NO_CAP:
            window = min(window, cap + windows[3]) if cap > 0 else 0.0
    elif status == 404:
        window = windows[2] if cap == NO_CAP else min(windows[2], cap)
    else:
        return False
    return max(0.0, now - written_at) < window


def _inflate(packed: bytes, limit: int) -> bytes:
    """Return `packed` inflated; raise `CorruptEntry` once more than `limit` bytes came out (so a
    bomb costs `limit` and a step, counted as the bytes come out of the decoder) or if bad."""
    inflater = zlib.decompressobj()
    parts: list[bytes] = []
    size = 0
    try:
        while not inflater.eof:
            part = inflater.decompress(packed, _INFLATE_STEP)
            packed = inflater.unconsumed_tail
            if not part:
                break  # All input taken and nothing pending: the stream ends before its end.
            size += len(part)
            if size > limit:
                raise CorruptEntry(f"body inflates past {limit} bytes")
            parts.append(part)
    except zlib.error as exc:
        raise CorruptEntry(f"bad compressed body: {exc}") from None
    if not inflater.eof:
        raise CorruptEntry("truncated compressed body")
    return b"".join(parts)
