"""The Host of every request head in a client's plain HTTP/1 stream, read as it arrives.

The transparent listener binds a plain HTTP connection to the name its first head claimed;
``HostWatch`` follows the rest of the client's stream (keep-alive, pipelining) so that a later
request cannot name another host on it. Heads are found by a real HTTP/1 parser (httptools), so
a body that looks like a head is read as the body it is. Reading stops at a request that asks to
change protocols (``Upgrade``, ``CONNECT``): what follows it may no longer be HTTP/1, and
``upgrade_at`` says where in the last read it begins; whether it is depends on the destination's
answer (a 101), which the caller reads.
"""

from __future__ import annotations

import httptools

from egressgw.wire.httphost import strip_port


class HostWatch:
    """The Host of every request head in a client's HTTP/1 stream, fed read by read."""

    __slots__ = ("_error", "_host", "_hosts", "_parser", "upgrade_at", "upgraded")

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._host: str | None = None
        self._hosts: list[str | None] = []
        self._error: str | None = None
        self.upgraded = False  # an upgrade was asked for: later bytes are not read
        self.upgrade_at = 0  # where in the last data fed the bytes after that request begin

    # -- parser callbacks (httptools hands each field whole) ---------------------------------
    def on_message_begin(self) -> None:
        self._host = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"host":
            if self._host is not None:
                self._error = "more than one Host field"
            self._host = strip_port(value.strip(b" \t").decode("latin-1"))

    def on_headers_complete(self) -> None:
        self._hosts.append(self._host or None)

    def feed(self, data: bytes) -> list[str | None]:
        """The Hosts (port removed) of the heads completed in ``data``, in order.

        Raises ``ValueError`` when the bytes are not HTTP/1 requests or a head is ambiguous.
        """
        if self.upgraded:
            return []
        self._hosts = []
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.upgraded = True
            self.upgrade_at = int(e.args[0]) if e.args else len(data)
        except httptools.HttpParserError as e:
            raise ValueError(f"not an HTTP/1 request: {e}") from None
        if self._error is not None:
            raise ValueError(self._error)
        return self._hosts
