"""The entry codec and cache keys."""

from __future__ import annotations

import os
import tracemalloc
import zlib
from urllib.parse import quote

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.entry import (
    CorruptEntry,
    Entry,
    decode,
    encode,
    etag_of,
    make_entry,
    stored_limit,
)
from cache.keys import composite_key


def test_make_entry_stamps_time_and_strong_etag() -> None:
    entry = make_entry(200, b'{"a":1}', True)
    assert entry.etag == etag_of(b'{"a":1}')
    assert entry.etag.startswith('"') and entry.etag.endswith('"') and len(entry.etag) == 34
    assert entry.etag != etag_of(b'{"a":2}')
    assert entry.written_at > 1_600_000_000


@pytest.mark.parametrize("status", [200, 404, 502])
@pytest.mark.parametrize("complete", [True, False])
def test_codec_round_trips_small_entries(status: int, complete: bool) -> None:
    entry = make_entry(status, b'{"product":{"id":42}}', complete)
    data = encode(entry)
    assert decode(data) == entry
    assert data.endswith(b'{"product":{"id":42}}')  # small bodies are stored raw


def test_codec_compresses_large_bodies_and_restores_them_exactly() -> None:
    body = orjson.dumps({"items": [{"id": i, "name": f"product {i}"} for i in range(500)]})
    entry = make_entry(200, body, True)
    data = encode(entry)
    assert len(data) < len(body) // 3
    assert decode(data) == entry


def test_codec_threshold_is_configurable() -> None:
    body = b'{"x":"' + b"a" * 200 + b'"}'
    entry = make_entry(200, body, True)
    assert len(encode(entry, compress_min_bytes=100)) < len(body)
    assert len(encode(entry, compress_min_bytes=10_000)) > len(body)
    assert decode(encode(entry, compress_min_bytes=100)) == entry


def test_codec_stores_incompressible_bodies_raw() -> None:
    body = os.urandom(8192)
    entry = Entry(200, body, True, 1.5, etag_of(body))
    data = encode(entry)
    assert data.endswith(body)
    assert decode(data) == entry


@pytest.mark.parametrize("data", [b"", b"GW", b"XX" + b"\0" * 40, b"\x00" * 100])
def test_decode_rejects_garbage(data: bytes) -> None:
    with pytest.raises(CorruptEntry):
        decode(data)


def test_decode_rejects_a_corrupt_compressed_body() -> None:
    entry = make_entry(200, b"[" + b"1," * 5000 + b"1]", True)
    data = encode(entry)
    with pytest.raises(CorruptEntry):
        decode(data[:-10] + b"0123456789")


def with_body(entry: Entry, packed: bytes) -> bytes:
    """Return `entry`'s stored form (compressed) with its body replaced by `packed`."""
    data = encode(entry, compress_min_bytes=0)
    return data[: -len(zlib.compress(entry.body, 1))] + packed


def test_decode_inflates_no_further_than_its_limit() -> None:
    entry = make_entry(200, b"0" * 100, True)
    bomb = zlib.compress(bytes(64 << 20), 9)  # 64 KB that inflate to 64 MB
    tracemalloc.start()
    try:
        with pytest.raises(CorruptEntry, match="inflates past 1048576"):
            decode(with_body(entry, bomb), max_body_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_decode_takes_bodies_up_to_its_limit_and_refuses_longer_ones() -> None:
    body = b"[" + b"1," * 5000 + b"1]"
    entry = make_entry(200, body, True)
    assert decode(encode(entry), max_body_bytes=len(body)) == entry
    with pytest.raises(CorruptEntry, match="inflates past"):
        decode(encode(entry), max_body_bytes=len(body) - 1)
    raw = encode(entry, compress_min_bytes=len(body) + 1)
    assert decode(raw, max_body_bytes=len(body)) == entry
    with pytest.raises(CorruptEntry, match="body over"):
        decode(raw, max_body_bytes=len(body) - 1)
    assert len(raw) == stored_limit(len(body)) - 255 + len(entry.etag)


def test_decode_rejects_a_truncated_compressed_body() -> None:
    entry = make_entry(200, b"[" + b"1," * 5000 + b"1]", True)
    data = encode(entry)
    with pytest.raises(CorruptEntry, match="truncated"):
        decode(data[:-20])


def test_composite_key_is_canonical_and_separates_parameters() -> None:
    a = composite_key("gw:", "/products/{id:int}", "d1", [("id", 42), ("lang", "en")])
    b = composite_key("gw:", "/products/{id:int}", "d1", [("lang", "en"), ("id", 42)])
    assert a == b
    assert a.startswith("gw:/products/")
    assert "{" not in a and "}" not in a
    assert a != composite_key("gw:", "/products/{id:int}", "d2", [("id", 42), ("lang", "en")])
    assert a != composite_key("gw:", "/products/{id:int}", "d1", [("id", 43), ("lang", "en")])


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ([("a", "1&b=2")], [("a", "1"), ("b", "2")]),
        ([("a", True)], [("a", 1)]),
        ([("a", None)], [("a", "!null")]),
        ([("a", "x:y")], [("a", "x"), ("y", "")]),
    ],
)
def test_composite_key_values_cannot_forge_another_key(
    one: list[tuple[str, object]], other: list[tuple[str, object]]
) -> None:
    assert composite_key("p:", "/e", "d", one) != composite_key("p:", "/e", "d", other)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.integers(),
        st.text(),
        st.text(alphabet=st.characters(min_codepoint=48, max_codepoint=122)),
        st.floats(allow_nan=False),
    )
)
def test_composite_key_encodes_each_value_exactly_as_percent_encoding_would(value: object) -> None:
    # The shortcuts for ints and plain letters and digits change no key that was ever written.
    text = repr(value) if isinstance(value, float) else str(value)
    expected = "p:/e:d:id=" + quote(text, safe="")
    assert composite_key("p:", "/e", "d", [("id", value)]) == expected


@pytest.mark.parametrize(
    ("status", "etag"),
    [
        (200, '"x"\r\nSet-Cookie: a=b'),  # a header of the attacker's, on every hit
        (200, "not-quoted-hex"),
        (0, etag_of(b"{}")),  # not an HTTP status
        (999, etag_of(b"{}")),
    ],
)
def test_decode_refuses_a_header_the_gateway_never_writes(status: int, etag: str) -> None:
    # What Redis holds is data from outside the process: its status and ETag go out as a
    # response's status line and header, so only what `make_entry` could have written passes.
    hostile = Entry(status, b"{}", True, 1_700_000_000.0, etag)
    with pytest.raises(CorruptEntry):
        decode(encode(hostile))
