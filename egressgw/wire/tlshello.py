"""TLS ClientHello reader: the SNI and ALPN a tunnel's client asks for.

Contract (fuzzed): ``parse_client_hello(buf)`` returns a ``ClientHello`` when ``buf`` starts with a
complete ClientHello, ``None`` when more bytes are needed, and raises ``ValueError`` when the bytes
are not a TLS ClientHello. The handshake message may span several TLS records; the total is
bounded by ``MAX_HELLO_SIZE``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAX_HELLO_SIZE = 64 * 1024
TLS_HANDSHAKE = 0x16  # the content type of the record a ClientHello starts with
_CLIENT_HELLO = 0x01
_EXT_SNI = 0x0000
_EXT_ALPN = 0x0010
_PAST_END = "ClientHello field runs past its end"
_EXTENSION_HEAD = struct.Struct(">HH")  # extension type, length


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What a ClientHello says about its destination."""

    sni: str | None
    alpn: tuple[str, ...]


def _handshake_bytes(buf: bytes) -> bytes | None:
    """Join the payloads of the leading handshake records until the ClientHello is whole."""
    if len(buf) >= 9 and buf[0] == TLS_HANDSHAKE and buf[1] == 3 and buf[5] == _CLIENT_HELLO:
        # The usual case, a whole ClientHello in the first record: no copy to join records.
        length = buf[3] << 8 | buf[4]
        needed = 4 + (buf[6] << 16 | buf[7] << 8 | buf[8])
        if needed <= length <= len(buf) - 5 and needed <= MAX_HELLO_SIZE:
            return bytes(buf[9 : 5 + needed])
    payload = bytearray()
    pos = 0
    while True:
        # Judge the record header by the bytes there are: a client that sends a few bytes of
        # another protocol and waits for an answer must not be kept waiting for more.
        if len(buf) > pos and buf[pos] != TLS_HANDSHAKE:
            raise ValueError("not a TLS handshake record")
        if len(buf) > pos + 1 and buf[pos + 1] != 3:
            raise ValueError("not a TLS record version")
        if len(buf) - pos < 5:
            return None
        length = int.from_bytes(buf[pos + 3 : pos + 5], "big")
        if length == 0:
            raise ValueError("empty TLS record")
        if len(buf) - pos - 5 < length:
            if not payload and len(buf) - pos >= 6 and buf[pos + 5] != _CLIENT_HELLO:
                raise ValueError("first handshake message is not a ClientHello")
            return None
        payload += buf[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if payload[0] != _CLIENT_HELLO:
            raise ValueError("first handshake message is not a ClientHello")
        if len(payload) >= 4:
            needed = 4 + int.from_bytes(payload[1:4], "big")
            if needed > MAX_HELLO_SIZE:
                raise ValueError("ClientHello larger than the limit")
            if len(payload) >= needed:
                return bytes(payload[4:needed])


def parse_client_hello(buf: bytes) -> ClientHello | None:
    """Parse a ClientHello from the start of a tunnel; None when more bytes are needed."""
    body = _handshake_bytes(buf)
    if body is None:
        return None
    # Plain index arithmetic, no reader object: every TLS tunnel's first bytes come here.
    end = len(body)
    pos = 34  # legacy_version, random
    if pos >= end:
        raise ValueError(_PAST_END)
    pos += 1 + body[pos]  # session id
    if pos + 2 > end:
        raise ValueError(_PAST_END)
    suites = body[pos] << 8 | body[pos + 1]
    pos += 2 + suites
    if pos > end:
        raise ValueError(_PAST_END)
    if not suites or suites % 2:
        raise ValueError("bad cipher suite list")
    if pos >= end:
        raise ValueError(_PAST_END)
    pos += 1 + body[pos]  # compression methods
    if pos > end:
        raise ValueError(_PAST_END)
    if pos == end:
        return ClientHello(None, ())
    if pos + 2 > end:
        raise ValueError(_PAST_END)
    extensions_end = pos + 2 + (body[pos] << 8 | body[pos + 1])
    if extensions_end > end:
        raise ValueError(_PAST_END)
    if extensions_end != end:
        raise ValueError("trailing bytes after ClientHello extensions")
    pos += 2
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    seen: set[int] = set()
    while pos < end:
        if pos + 4 > end:
            raise ValueError(_PAST_END)
        ext_type, size = _EXTENSION_HEAD.unpack_from(body, pos)  # in bounds: checked above
        start = pos + 4
        pos = start + size
        if pos > end:
            raise ValueError(_PAST_END)
        if ext_type in seen:
            raise ValueError(f"duplicate extension {ext_type}")
        seen.add(ext_type)
        if ext_type == _EXT_SNI:
            sni = _parse_sni(body, start, pos)
        elif ext_type == _EXT_ALPN:
            alpn = _parse_alpn(body, start, pos)
    return ClientHello(sni, alpn)


def _vector2(body: bytes, pos: int, end: int) -> tuple[int, int]:
    """The bounds of the vector with a 2-byte length at pos, within end."""
    if pos + 2 > end:
        raise ValueError(_PAST_END)
    start = pos + 2
    stop = start + (body[pos] << 8 | body[pos + 1])
    if stop > end:
        raise ValueError(_PAST_END)
    return start, stop


def _parse_sni(body: bytes, pos: int, end: int) -> str | None:
    pos, end = _vector2(body, pos, end)  # server_name_list; bytes after it are ignored
    host: str | None = None
    while pos < end:
        name_type = body[pos]
        start, pos = _vector2(body, pos + 1, end)
        if name_type == 0:
            if host is not None:
                raise ValueError("more than one host_name in server_name")
            try:
                host = body[start:pos].decode("ascii")
            except UnicodeDecodeError as e:
                raise ValueError("server_name is not ASCII") from e
    return host


def _parse_alpn(body: bytes, pos: int, end: int) -> tuple[str, ...]:
    pos, end = _vector2(body, pos, end)  # protocol_name_list
    names = []
    while pos < end:
        start = pos + 1
        pos = start + body[pos]
        if pos > end:
            raise ValueError(_PAST_END)
        names.append(body[start:pos].decode("ascii", "replace"))
    return tuple(names)
