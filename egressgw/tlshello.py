"""TLS ClientHello reader: the SNI and ALPN a tunnel's client asks for.

Contract (fuzzed): ``parse_client_hello(buf)`` returns a ``ClientHello`` when ``buf`` starts with a
complete ClientHello, ``None`` when more bytes are needed, and raises ``ValueError`` when the bytes
are not a TLS ClientHello. The handshake message may span several TLS records; the total is
bounded by ``MAX_HELLO_SIZE``.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HELLO_SIZE = 64 * 1024
TLS_HANDSHAKE = 0x16  # the content type of the record a ClientHello starts with
_CLIENT_HELLO = 0x01
_EXT_SNI = 0x0000
_EXT_ALPN = 0x0010


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What a ClientHello says about its destination."""

    sni: str | None
    alpn: tuple[str, ...]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("ClientHello field runs past its end")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> bytes:
        return self.take(self.uint(length_bytes))


def _handshake_bytes(buf: bytes) -> bytes | None:
    """Join the payloads of the leading handshake records until the ClientHello is whole."""
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
    r = _Reader(body)
    r.take(2)  # legacy_version
    r.take(32)  # random
    r.vector(1)  # session id
    suites = r.vector(2)
    if not suites or len(suites) % 2:
        raise ValueError("bad cipher suite list")
    r.vector(1)  # compression methods
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    if r.pos == len(body):
        return ClientHello(None, ())
    extensions = _Reader(r.vector(2))
    if r.pos != len(body):
        raise ValueError("trailing bytes after ClientHello extensions")
    seen: set[int] = set()
    while extensions.pos < len(extensions.data):
        ext_type = extensions.uint(2)
        ext = _Reader(extensions.vector(2))
        if ext_type in seen:
            raise ValueError(f"duplicate extension {ext_type}")
        seen.add(ext_type)
        if ext_type == _EXT_SNI:
            sni = _parse_sni(ext)
        elif ext_type == _EXT_ALPN:
            protocols = _Reader(ext.vector(2))
            names = []
            while protocols.pos < len(protocols.data):
                names.append(protocols.vector(1).decode("ascii", "replace"))
            alpn = tuple(names)
    return ClientHello(sni, alpn)


def _parse_sni(ext: _Reader) -> str | None:
    names = _Reader(ext.vector(2))
    host: str | None = None
    while names.pos < len(names.data):
        name_type = names.uint(1)
        value = names.vector(2)
        if name_type == 0:
            if host is not None:
                raise ValueError("more than one host_name in server_name")
            try:
                host = value.decode("ascii")
            except UnicodeDecodeError as e:
                raise ValueError("server_name is not ASCII") from e
    return host
