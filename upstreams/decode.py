"""Response bodies: decompressed in bounded slices and decoded as JSON, for both HTTP clients.

Bodies are decompressed here, not by the clients, so `max_bytes` bounds the bytes coming out of
the decoder, which runs in slices that never hold the event loop for long (a 1 MB gzip body can
inflate to 1 GB).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator

import orjson

from gateway.core.errors import BadPayload
from gateway.core.types import JSON

ACCEPT_ENCODING = "gzip, deflate"
"""What both clients ask for: only the codings `_decoder` can inflate in bounded slices."""
SLICE_BYTES = 256 * 1024
"""The most one decompression step produces before the event loop gets a turn (~1 ms)."""


async def read_body(
    source: str, chunks: AsyncIterator[bytes], max_bytes: int, encoding: str = ""
) -> bytes:
    """Return the whole decoded body, failing as soon as it grows past `max_bytes`.

    The limit counts decoded bytes as they leave the decoder, which never produces more than
    `SLICE_BYTES` before the event loop gets a turn; a bomb costs `max_bytes`, not its size.
    """
    decoder = _decoder(source, encoding)
    parts: list[bytes] = []
    size = 0
    # Compressed input is bounded too: empty gzip members or deflate blocks decode to nothing,
    # and would be read until the call's timeout. Incompressible data grows a little when
    # compressed, hence the slack.
    raw_limit = max_bytes + max_bytes // 8 + 64 * 1024
    raw = 0
    async for chunk in chunks:
        if not chunk:
            continue
        raw += len(chunk)
        if decoder is not None and raw > raw_limit:
            raise BadPayload(f"{source}: compressed body is over max_bytes ({max_bytes})")
        while True:
            piece = chunk if decoder is None else decoder.decompress(chunk, SLICE_BYTES)
            size += len(piece)
            if size > max_bytes:
                # Leaving the response unread makes both clients close the connection, not reuse it.
                raise BadPayload(f"{source}: body is over max_bytes ({max_bytes})")
            parts.append(piece)
            if decoder is None or not decoder.pending:
                break
            chunk = b""
            await asyncio.sleep(0)
    if decoder is not None and parts and not decoder.eof:
        raise BadPayload(f"{source}: compressed body ends before its end marker")
    return b"".join(parts)


class _Zlib:
    """A gzip or deflate decoder that produces at most `max_length` bytes per step.

    `pending` says that input (or output) is left over for the next step. A gzip body may hold
    several members, one after another; `deflate` is a zlib stream, or a raw deflate stream
    from servers that got RFC 9110 wrong (as curl and both clients accept).
    """

    def __init__(self, source: str, coding: str) -> None:
        self.source = source
        self.gzip = coding == "gzip"
        self._wbits = 16 + zlib.MAX_WBITS if self.gzip else zlib.MAX_WBITS
        self._z = zlib.decompressobj(self._wbits)
        self._fresh = True  # nothing produced yet: a raw deflate stream can still be detected
        self._tail = b""
        self._full = False

    @property
    def eof(self) -> bool:
        """True once the stream's end marker was read, with nothing after it still to decode."""
        return self._z.eof and not self._tail

    @property
    def pending(self) -> bool:
        """True when the last step stopped at `max_length`: call again, with or without input."""
        return bool(self._tail) or self._full

    def decompress(self, data: bytes, max_length: int) -> bytes:
        """Return up to `max_length` decoded bytes of what is pending plus `data`."""
        data = self._tail + data if self._tail else data
        if self._z.eof:
            if not self.gzip or not data.strip(b"\0"):
                self._tail, self._full = b"", False
                return b""  # trailing padding after the stream, as some servers send
            self._z = zlib.decompressobj(self._wbits)  # the next gzip member
        try:
            out = self._z.decompress(data, max_length)
        except zlib.error as exc:
            if not (self._fresh and not self.gzip):
                raise BadPayload(f"{self.source}: compressed body is corrupt: {exc}") from None
            self._wbits = -zlib.MAX_WBITS
            self._z = zlib.decompressobj(self._wbits)
            try:
                out = self._z.decompress(data, max_length)
            except zlib.error as exc2:
                raise BadPayload(f"{self.source}: compressed body is corrupt: {exc2}") from None
        self._fresh = False
        self._tail = self._z.unconsumed_tail or (self._z.unused_data if self._z.eof else b"")
        self._full = len(out) == max_length
        return out


def _decoder(source: str, encoding: str) -> _Zlib | None:
    """Return the decoder for a `Content-Encoding` value (None for none); refuse anything else.

    Only one coding is accepted: a stacked one (`gzip, gzip`) multiplies what a small body can
    become, and nothing we asked for (`ACCEPT_ENCODING`) needs it.
    """
    codings = [c.strip().lower() for c in encoding.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) > 1:
        raise BadPayload(f"{source}: stacked Content-Encoding {encoding!r} is refused")
    coding = {"x-gzip": "gzip"}.get(codings[0], codings[0])
    if coding not in ("gzip", "deflate"):
        raise BadPayload(f"{source}: Content-Encoding {codings[0]!r} cannot be decoded")
    return _Zlib(source, coding)


def json_body(source: str, status: int, body: bytes) -> JSON:
    """Return the decoded JSON body (None for 204 No Content)."""
    if status == 204:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadPayload(f"{source}: body is not JSON: {exc}") from None
