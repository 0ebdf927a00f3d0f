"""A cached composite answer and its byte codec: a small header, then the body (zlib if large)."""

from __future__ import annotations

import struct
import time
import zlib
from dataclasses import dataclass
from hashlib import blake2b

COMPRESS_MIN_BYTES = 4096
"""Bodies at least this long are stored zlib-compressed, unless the caller says otherwise."""

# magic, version, flags, status, written_at, etag length; then the etag, then the body.
_HEADER = struct.Struct(">2sBBHdB")
_MAGIC = b"GW"
_VERSION = 1
_COMPLETE = 0x01
_ZLIB = 0x02


@dataclass(frozen=True, slots=True)
class Entry:
    """One composite answer as it is sent: status, encoded JSON body, completeness, age and ETag."""

    status: int
    body: bytes
    complete: bool
    written_at: float
    etag: str


class CorruptEntry(ValueError):
    """Stored bytes are not an entry this codec wrote (another version, truncated, garbage)."""


def make_entry(status: int, body: bytes, complete: bool) -> Entry:
    """Return an entry stamped with the current time and a strong ETag over `body`."""
    return Entry(status, body, complete, time.time(), etag_of(body))


def etag_of(body: bytes) -> str:
    """Return the strong ETag (quoted 128-bit BLAKE2b hex digest) of a body."""
    return '"' + blake2b(body, digest_size=16).hexdigest() + '"'


def encode(entry: Entry, compress_min_bytes: int = COMPRESS_MIN_BYTES) -> bytes:
    """Return the stored form of an entry; the body is compressed when it is long and shrinks."""
    flags = _COMPLETE if entry.complete else 0
    body = entry.body
    if len(body) >= compress_min_bytes:
        packed = zlib.compress(body, 1)
        # Already-dense bodies can grow; storing them raw keeps hits free of a pointless inflate.
        if len(packed) < len(body):
            body, flags = packed, flags | _ZLIB
    etag = entry.etag.encode("ascii")
    header = _HEADER.pack(_MAGIC, _VERSION, flags, entry.status, entry.written_at, len(etag))
    return b"".join((header, etag, body))


def decode(data: bytes) -> Entry:
    """Return the entry stored in `data` without parsing its JSON; raise `CorruptEntry` if bad."""
    try:
        magic, version, flags, status, written_at, etag_len = _HEADER.unpack_from(data)
    except struct.error:
        raise CorruptEntry("shorter than an entry header") from None
    if magic != _MAGIC or version != _VERSION:
        raise CorruptEntry(f"not an entry of codec version {_VERSION}")
    start = _HEADER.size + etag_len
    if len(data) < start:
        raise CorruptEntry("truncated ETag")
    etag = data[_HEADER.size : start].decode("ascii", "replace")
    body = data[start:]
    if flags & _ZLIB:
        try:
            body = zlib.decompress(body)
        except zlib.error as exc:
            raise CorruptEntry(f"bad compressed body: {exc}") from None
    return Entry(status, body, bool(flags & _COMPLETE), written_at, etag)
