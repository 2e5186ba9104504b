"""The Host of a plain HTTP request's first head, read from a connection's first bytes. Pure.

Contract (as ``tlshello``'s): ``parse_http_host(buf)`` returns an ``HttpHost``, ``None`` when
more bytes are needed, or raises ``ValueError`` when the bytes are not an HTTP/1 request head.
Only what naming the destination needs is read: the request line's shape and the ``Host``
field (its port removed). A head larger than ``MAX_HEAD_SIZE`` is refused. The request itself
is relayed untouched: nothing here rewrites it.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HEAD_SIZE = 16 * 1024  # bytes of head read before the Host must have shown up
MAX_METHOD = 20  # the longest method token accepted (WebDAV's are the longest in use)


@dataclass(frozen=True, slots=True)
class HttpHost:
    """A request head's Host (without port), None when it has none."""

    host: str | None


def _method_ok(token: bytes) -> bool:
    return 0 < len(token) <= MAX_METHOD and token.isalpha() and token.isupper()


def parse_http_host(buf: bytes) -> HttpHost | None:
    """Read the Host field of the request head at the start of ``buf`` (contract above)."""
    line_end = buf.find(b"\r\n")
    first = buf if line_end < 0 else buf[:line_end]
    method, space, rest = first.partition(b" ")
    if not space:
        if line_end < 0 and len(buf) <= MAX_METHOD and (not buf or _method_ok(buf)):
            return None  # a method still arriving
        raise ValueError("not an HTTP request line")
    if not _method_ok(method):
        raise ValueError("not an HTTP request line")
    if line_end < 0:
        if len(buf) > MAX_HEAD_SIZE:
            raise ValueError(f"HTTP request line longer than {MAX_HEAD_SIZE} bytes")
        return None
    if not rest.endswith((b" HTTP/1.1", b" HTTP/1.0")):
        raise ValueError("not an HTTP/1 request line")
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD_SIZE:
            raise ValueError(f"HTTP request head longer than {MAX_HEAD_SIZE} bytes")
        return None
    if end > MAX_HEAD_SIZE:
        raise ValueError(f"HTTP request head longer than {MAX_HEAD_SIZE} bytes")
    host: str | None = None
    fields = buf[line_end + 2 : end].split(b"\r\n") if end > line_end else []
    for line in fields:
        name, colon, value = line.partition(b":")
        if not colon:
            raise ValueError("malformed header field")
        if name.lower() == b"host":
            if host is not None:
                raise ValueError("more than one Host field")
            host = strip_port(value.strip(b" \t").decode("latin-1"))
    return HttpHost(host or None)


def strip_port(authority: str) -> str:
    """An authority (``host[:port]``, IPv6 bracketed) without its port."""
    if authority.startswith("["):
        return authority[: authority.find("]") + 1] if "]" in authority else authority
    host, _, _ = authority.partition(":")
    return host
