"""Tests of the HTTP/1.1 framing rules: which field frames a body, which fields cross the proxy."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressgw.wire import framing
from egressgw.wire.framing import Framing, Kind

H = list[tuple[bytes, bytes]]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], framing.NO_BODY),
        ([(b"Content-Length", b"50")], Framing(Kind.LENGTH, 50)),
        ([(b"content-length", b"0")], Framing(Kind.LENGTH, 0)),
        ([(b"Content-Length", b"7"), (b"Content-Length", b" 7 ")], Framing(Kind.LENGTH, 7)),
        ([(b"Transfer-Encoding", b"chunked")], framing.CHUNKED),
        (
            [(b"Transfer-Encoding", b"gzip"), (b"Transfer-Encoding", b"Chunked")],
            Framing(Kind.CHUNKED, codings=b"gzip"),
        ),
    ],
    ids=["none", "length", "zero", "equal-repeat", "chunked", "gzip-then-chunked"],
)
def test_request_framing(headers: H, expected: Framing) -> None:
    """A request body is framed by Transfer-Encoding, else Content-Length, else has none."""
    assert framing.parse_request_framing(headers) == expected


@pytest.mark.parametrize(
    "headers",
    [
        [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
        [(b"Content-Length", b"5"), (b"Content-Length", b"6")],
        [(b"Content-Length", b"-1")],
        [(b"Content-Length", b"5, 5")],
        [(b"Content-Length", b"9" * 40)],
        [(b"Transfer-Encoding", b"gzip")],
        [(b"Transfer-Encoding", b"chunked, gzip")],
        [(b"Transfer-Encoding", b"chunked, chunked")],
        [(b"Transfer-Encoding", b"")],
    ],
    ids=[
        "both",
        "conflicting",
        "negative",
        "list",
        "huge",
        "not-chunked",
        "chunked-not-last",
        "chunked-twice",
        "empty",
    ],
)
def test_request_framing_that_could_be_read_two_ways_is_refused(headers: H) -> None:
    """Ambiguous request framing raises ValueError (answered 400, never forwarded)."""
    with pytest.raises(ValueError):
        framing.parse_request_framing(headers)


@pytest.mark.parametrize(
    ("status", "headers", "head", "expected"),
    [
        (200, [(b"Content-Length", b"5")], False, Framing(Kind.LENGTH, 5)),
        (200, [(b"Transfer-Encoding", b"chunked")], False, framing.CHUNKED),
        (200, [(b"Transfer-Encoding", b"gzip")], False, Framing(Kind.CLOSE, codings=b"gzip")),
        (
            200,
            [(b"Transfer-Encoding", b"chunked, gzip")],
            False,
            Framing(Kind.CLOSE, codings=b"chunked, gzip"),
        ),
        (200, [], False, Framing(Kind.CLOSE)),
        (200, [(b"Content-Length", b"5")], True, Framing(Kind.NONE, 5)),
        (304, [(b"Content-Length", b"5")], False, Framing(Kind.NONE, 5)),
        (204, [(b"Content-Length", b"5")], False, framing.NO_BODY),
        (204, [], False, framing.NO_BODY),
    ],
    ids=["length", "chunked", "gzip", "chunked-not-last", "close", "head", "304", "204-cl", "204"],
)
def test_response_framing(status: int, headers: H, head: bool, expected: Framing) -> None:
    """A response whose final coding is not chunked, or with no length, runs to the close."""
    assert framing.parse_response_framing(status, headers, head) == expected


def test_response_with_both_length_and_coding_is_refused() -> None:
    """Content-Length beside Transfer-Encoding in a response raises ValueError (a 502)."""
    with pytest.raises(ValueError):
        framing.parse_response_framing(
            200, [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")], False
        )


def test_connection_tokens_cannot_name_framing_or_host() -> None:
    """Connection may drop any field except Content-Length, Transfer-Encoding and Host."""
    headers = [
        (b"Connection", b"Content-Length, X-A"),
        (b"connection", b" HOST ,transfer-encoding"),
    ]
    assert framing.connection_tokens(headers) == frozenset({b"x-a"})


def test_forwarded_fields_drop_hop_by_hop_framing_and_named_fields() -> None:
    """Hop-by-hop, framing and Connection-named fields stay; Host stays only when asked."""
    headers = [
        (b"X-A", b"1"),
        (b"Content-Length", b"50"),
        (b"Upgrade", b"h2c"),
        (b"HTTP2-Settings", b"AAA"),
        (b"Host", b"h"),
        (b"Accept", b"*/*"),
        (b"Connection", b"x-a, Content-Length, upgrade"),
    ]
    kept = framing.forwarded_fields(headers)
    assert [name for _, name, _ in kept] == [b"Host", b"Accept"]
    assert framing.forwarded_fields(headers, frozenset({b"host"}))[0][1] == b"Accept"


@pytest.mark.parametrize(
    ("fr", "chunked_ok", "expected"),
    [
        (Framing(Kind.LENGTH, 50), True, b"Content-Length: 50\r\n"),
        (Framing(Kind.NONE, 5), True, b"Content-Length: 5\r\n"),
        (framing.NO_BODY, True, b""),
        (framing.CHUNKED, True, b"Transfer-Encoding: chunked\r\n"),
        (framing.CHUNKED, False, b""),
        (Framing(Kind.CLOSE, codings=b"gzip"), True, b"Transfer-Encoding: gzip\r\n"),
        (Framing(Kind.CLOSE), True, b""),
        (Framing(Kind.CHUNKED, codings=b"gzip"), True, b"Transfer-Encoding: gzip, chunked\r\n"),
    ],
)
def test_framing_fields_forward_what_was_read(
    fr: Framing, chunked_ok: bool, expected: bytes
) -> None:
    """The forwarded framing fields are exactly those of the framing the message was read with."""
    assert framing.to_framing_fields(fr, chunked_ok) == expected


@pytest.mark.parametrize(
    "headers",
    [[(b"Transfer-Encoding", b"gzip, chunked")], [(b"Transfer-Encoding", b"chunked, gzip")]],
    ids=["gzip-then-chunked", "close-delimited-gzip"],
)
def test_response_transfer_codings_are_kept_and_forwarded(headers: H) -> None:
    """`gzip, chunked` is re-chunked with gzip still named; never dropped for HTTP/1.1."""
    read = framing.parse_response_framing(200, headers, head_request=False)
    assert read.codings.startswith(b"gzip") or read.codings == b"chunked, gzip"
    fields = framing.to_framing_fields(read)
    name, _, value = fields.rstrip(b"\r\n").partition(b": ")
    assert framing.parse_response_framing(200, [(name, value)], head_request=False) == read


@pytest.mark.parametrize(
    "fr",
    [Framing(Kind.CHUNKED, codings=b"gzip"), Framing(Kind.CLOSE, codings=b"gzip")],
    ids=["gzip-chunked", "gzip-to-close"],
)
def test_a_transfer_coding_an_http10_peer_cannot_know_is_refused(fr: Framing) -> None:
    """For an HTTP/1.0 recipient a transfer coding other than chunked is a ValueError."""
    with pytest.raises(ValueError, match=r"HTTP/1\.0"):
        framing.to_framing_fields(fr, chunked_ok=False)


NAMES = st.sampled_from(
    [b"Content-Length", b"Transfer-Encoding", b"Connection", b"Host", b"X-A", b"TE"]
)
VALUES = st.sampled_from([b"5", b"6", b"chunked", b"gzip", b"Content-Length", b"x-a, host", b""])


@given(st.lists(st.tuples(NAMES, VALUES), max_size=6))
def test_request_framing_is_forwarded_as_read(headers: H) -> None:
    """Whatever the fields, the forwarded framing fields re-parse to the framing read."""
    try:
        read = framing.parse_request_framing(headers)
    except ValueError:
        return
    kept = [(name, value) for _, name, value in framing.forwarded_fields(headers)]
    forwarded = framing.to_framing_fields(read)
    if forwarded:
        name, _, value = forwarded.rstrip(b"\r\n").partition(b": ")
        kept.append((name, value))
    assert framing.parse_request_framing(kept) == read


@given(st.lists(st.tuples(NAMES, VALUES), max_size=6))
def test_one_pass_splits_a_head_as_the_rules_do(headers: H) -> None:
    """split_fields gives what crosses (rules 3 and 4, applied field by field) and the framing
    fields (for parse_*_framing, which read no other), from one pass over the head.
    """
    tokens = framing.connection_tokens(headers)
    expected = [
        (name.lower(), name, value)
        for name, value in headers
        if name.lower() not in framing.HOP_BY_HOP | framing.FRAMING | tokens
    ]
    kept, framed_by = framing.split_fields(headers)
    assert kept == expected == framing.forwarded_fields(headers)
    assert framed_by == [(n, v) for n, v in headers if n.lower() in framing.FRAMING]
    try:
        whole = framing.parse_request_framing(headers)
    except ValueError:
        whole = None
    try:
        split = framing.parse_request_framing(framed_by)
    except ValueError:
        split = None
    assert whole == split
