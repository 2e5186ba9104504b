"""A stand-in for the gateway around a client connection (its Hub), and a client stream that
only says how much it still buffers: for tests of the listeners' connection classes.
"""

from __future__ import annotations

from typing import Any

from egressgw.config.model import ProxyConfig
from egressgw.flow import Flow


class FakeHub:
    """The gateway as a connection sees it; records what it is told."""

    def __init__(self) -> None:
        self.limits = ProxyConfig()
        self.clock = 0.0
        self.open: set[Any] = set()
        self.closed: list[Any] = []
        self.decided: list[Flow] = []
        self.ended: list[Flow] = []
        self.errors: list[str] = []
        self.tunnels = 0

    def connection_opened(self, conn: Any) -> str | None:
        """Admit every connection."""
        self.open.add(conn)
        return None

    def connection_closed(self, conn: Any) -> None:
        """Forget a connection."""
        self.open.discard(conn)
        self.closed.append(conn)

    def flow_decided(self, flow: Flow) -> None:
        """Record a decided flow."""
        self.decided.append(flow)

    def flow_ended(self, flow: Flow) -> None:
        """Record an ended flow."""
        self.ended.append(flow)

    def count_error(self, kind: str) -> None:
        """Record an error's kind."""
        self.errors.append(kind)

    def tunnel_opened(self) -> None:
        """Count an open tunnel."""
        self.tunnels += 1

    def tunnel_closed(self) -> None:
        """Count a closed tunnel."""
        self.tunnels -= 1


class FakeStream:
    """A client stream holding ``buffered`` bytes it has not sent yet."""

    def __init__(self, buffered: int = 0) -> None:
        self.buffered = buffered
        self.closed_how = ""
        self.written: list[bytes] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """A client on 127.0.0.9."""
        return ("127.0.0.9", 50000) if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        """What the test said it buffers."""
        return self.buffered

    def is_closing(self) -> bool:
        """True once closed."""
        return bool(self.closed_how)

    def write(self, data: bytes) -> None:
        """Keep what the connection writes."""
        self.written.append(bytes(data))

    def close(self) -> None:
        """Close after flushing."""
        self.closed_how = "close"

    def close_quietly(self) -> None:
        """Close without a connection_lost."""
        self.closed_how = "quietly"
