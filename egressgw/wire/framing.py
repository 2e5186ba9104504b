"""HTTP/1.1 message framing for a forwarding proxy: which field frames a body, which never cross.

Pure: header lists in, decisions out (bytes names and values as the parser delivers them).

Rules (RFC 9112 §6-7, RFC 9110 §7.6.1):

1. A request body is framed by Transfer-Encoding when present (its final coding must be
   ``chunked``), else by Content-Length (one valid value; equal repeats allowed), else it has
   none. Both together, an invalid or conflicting length, or ``chunked`` anywhere but last is a
   ``ValueError``: the sender and a later recipient could disagree on where the body ends.
2. A response to HEAD and a 1xx, 204 or 304 has no body. Otherwise Transfer-Encoding frames it:
   chunked when ``chunked`` is the final coding, else the body runs to the connection's close.
   Then Content-Length; then, with neither, the close.
3. The proxy forwards the framing it read the message with, and no other: every incoming
   Content-Length and Transfer-Encoding field is dropped and ``to_framing_fields`` writes them
   anew, so no header trick can make the next hop split the bytes differently. Transfer codings
   other than ``chunked`` (``gzip, chunked``) are kept and forwarded: the body stays coded, and
   the recipient must be told. An HTTP/1.0 recipient gets a chunked body de-chunked; a coding
   it cannot know (any other) is a ``ValueError``: refuse rather than send it unlabelled.
4. Hop-by-hop fields (``HOP_BY_HOP``) and those a Connection field names are not forwarded;
   a Connection token naming a ``PROTECTED`` field (framing, Host) is ignored.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

# Fields that describe one hop only (RFC 9110 §7.6.1, plus the proxy-auth pair, Proxy-Connection
# that old clients still send, and HTTP2-Settings of the h2c upgrade the proxy drops).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
    }
)
# Fields that frame a message, or say where it goes: a Connection token cannot remove them.
PROTECTED = frozenset({b"content-length", b"transfer-encoding", b"host"})
# The fields the proxy always writes itself (rule 3).
FRAMING = frozenset({b"content-length", b"transfer-encoding"})
# Longer lengths than this are refused rather than parsed (about 10**18 bytes).
MAX_LENGTH_DIGITS = 18


class Kind(enum.Enum):
    """How a message body is delimited."""

    NONE = 1  # no body
    LENGTH = 2  # Content-Length bytes
    CHUNKED = 3  # chunked transfer coding
    CLOSE = 4  # until the connection closes (responses only)


class Framing:
    """How one message body is delimited; ``length`` is -1 when no Content-Length applies."""

    __slots__ = ("codings", "kind", "length")

    def __init__(self, kind: Kind, length: int = -1, codings: bytes = b"") -> None:
        self.kind = kind
        self.length = length
        # The transfer codings other than a final chunked, as sent (b"gzip" of "gzip, chunked").
        self.codings = codings

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Framing) and (self.kind, self.length, self.codings) == (
            other.kind,
            other.length,
            other.codings,
        )

    def __hash__(self) -> int:
        return hash((self.kind, self.length, self.codings))

    def __repr__(self) -> str:
        return f"Framing({self.kind.name}, {self.length}, {self.codings!r})"


NO_BODY = Framing(Kind.NONE)
CHUNKED = Framing(Kind.CHUNKED)


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """The Content-Length of the fields (-1 when absent); ``ValueError`` when invalid."""
    length = -1
    for name, value in headers:
        if name.lower() != b"content-length":
            continue
        text = value.strip(b" \t")
        if not text.isdigit() or len(text) > MAX_LENGTH_DIGITS:
            raise ValueError(f"invalid Content-Length {value[:40]!r}")
        n = int(text)
        if length not in (-1, n):
            raise ValueError("conflicting Content-Length fields")
        length = n
    return length


def _codings(headers: Iterable[tuple[bytes, bytes]]) -> list[bytes] | None:
    """The transfer codings in order, lowercased (None when there is no Transfer-Encoding)."""
    found: list[bytes] | None = None
    for name, value in headers:
        if name.lower() == b"transfer-encoding":
            if found is None:
                found = []
            found += [c.strip(b" \t").lower() for c in value.split(b",") if c.strip(b" \t")]
    return found


def parse_request_framing(headers: Iterable[tuple[bytes, bytes]]) -> Framing:
    """A request's body framing (rule 1); ``ValueError`` for framing that could be read two ways."""
    headers = list(headers)
    codings = _codings(headers)
    length = _content_length(headers)
    if codings is None:
        return NO_BODY if length < 0 else Framing(Kind.LENGTH, length)
    if length >= 0:
        raise ValueError("both Transfer-Encoding and Content-Length")
    if not codings or codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
        raise ValueError("Transfer-Encoding must end with chunked, once")
    return _chunked(codings)


def _chunked(codings: list[bytes]) -> Framing:
    """Chunked framing, keeping the codings applied before chunked."""
    return CHUNKED if len(codings) == 1 else Framing(Kind.CHUNKED, codings=b", ".join(codings[:-1]))


def parse_response_framing(
    status: int, headers: Iterable[tuple[bytes, bytes]], head_request: bool
) -> Framing:
    """A response's body framing (rule 2); ``ValueError`` for contradictory framing fields."""
    headers = list(headers)
    codings = _codings(headers)
    length = _content_length(headers)
    if codings is not None and length >= 0:
        raise ValueError("both Transfer-Encoding and Content-Length")
    if head_request or status == 304:
        # No body; a Content-Length still tells the length of what GET would return.
        return NO_BODY if length < 0 else Framing(Kind.NONE, length)
    if status < 200 or status == 204:
        return NO_BODY
    if codings is not None:
        if codings and codings[-1] == b"chunked" and codings.count(b"chunked") == 1:
            return _chunked(codings)
        return Framing(Kind.CLOSE, codings=b", ".join(codings))
    if length >= 0:
        return Framing(Kind.LENGTH, length)
    return Framing(Kind.CLOSE)


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The field names the Connection fields list, lowercased, ``PROTECTED`` ones left out."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip(b" \t").lower() for t in value.split(b","))
    return frozenset(tokens - PROTECTED)


def forwarded_fields(
    headers: Iterable[tuple[bytes, bytes]], also_drop: frozenset[bytes] = frozenset()
) -> list[tuple[bytes, bytes, bytes]]:
    """(lowercased name, name, value) of the fields that cross the proxy, in their order.

    Hop-by-hop, framing and Connection-named fields (rules 3 and 4) and ``also_drop`` stay.
    """
    return split_fields(headers, NOT_FORWARDED | also_drop)[0]


# The fields that never cross (rules 3 and 4, before Connection names any).
NOT_FORWARDED = HOP_BY_HOP | FRAMING


def split_fields(
    headers: Iterable[tuple[bytes, bytes]], dropped: frozenset[bytes] = NOT_FORWARDED
) -> tuple[list[tuple[bytes, bytes, bytes]], list[tuple[bytes, bytes]]]:
    """``forwarded_fields`` and the framing fields (Content-Length, Transfer-Encoding, for
    ``parse_*_framing``), in one pass over the head: what the proxy does with every message.

    ``dropped`` must hold ``NOT_FORWARDED`` (and whatever else stays).
    """
    kept = []
    framing_fields = []
    tokens: set[bytes] | None = None
    for name, value in headers:
        lower = name.lower()
        if lower in dropped:
            if lower in FRAMING:
                framing_fields.append((name, value))
            elif lower == b"connection":
                if tokens is None:
                    tokens = set()
                tokens.update(t.strip(b" \t").lower() for t in value.split(b","))
            continue
        kept.append((lower, name, value))
    if tokens:
        tokens -= PROTECTED
        if tokens:
            kept = [field for field in kept if field[0] not in tokens]
    return kept, framing_fields


def to_framing_fields(framing: Framing, chunked_ok: bool = True) -> bytes:
    """The framing field lines to forward a message read with ``framing`` (rule 3).

    ``chunked_ok`` False (an HTTP/1.0 recipient): a chunked body goes de-chunked up to the
    close, with no field; ``ValueError`` when other transfer codings would need one.
    """
    kind, codings = framing.kind, framing.codings
    if codings and not chunked_ok:
        raise ValueError(f"transfer coding {codings[:40]!r} cannot be sent to an HTTP/1.0 peer")
    if kind is Kind.CHUNKED:
        if not chunked_ok:
            return b""
        if codings:
            return b"Transfer-Encoding: " + codings + b", chunked\r\n"
        return b"Transfer-Encoding: chunked\r\n"
    if framing.length >= 0:
        return b"Content-Length: %d\r\n" % framing.length
    if kind is Kind.CLOSE and codings:
        return b"Transfer-Encoding: " + codings + b"\r\n"
    return b""
