"""Stand-ins for the gateway around a client connection (its Hub: records only, or on the
running loop with a real runtime) and for a client stream: for tests of the listeners.
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any, cast

from egressgw.config.model import ProxyConfig, load_policy
from egressgw.decision.guard import Guard
from egressgw.decision.path import Runtime
from egressgw.flow import Flow
from egressgw.identity.static import StaticInventory
from egressgw.net.pool import IdlePool
from egressgw.net.rawstream import Reactor
from egressgw.resolver import ResolveError, Resolver


class FakeHub:
    """The gateway as a connection sees it; records what it is told."""

    def __init__(self) -> None:
        self.limits = ProxyConfig()
        self.clock = 0.0
        self.egress_ips: dict[str, Any] = {}
        self.upstreams: IdlePool[Any] = IdlePool()
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


POLICY = """\
default: deny
tiers:
  - name: t
    rules:
      - name: not-this-name
        action: deny
        to: {domains: ["blocked.test"]}
      - name: loopback
        action: allow
        to: {cidrs: ["127.0.0.1/32"]}
"""


class NoNames:
    """A resolver that knows no name (tests connect to addresses)."""

    def cached(self, name: str, now: float) -> None:
        """Nothing is cached."""
        return None

    async def resolve(self, name: str, source: str | None = None) -> Any:
        """Every name is unknown."""
        raise ResolveError(name, "no such name")


def loopback_runtime(tmp_path: Path) -> Runtime:
    """A runtime allowing 127.0.0.1 (the guard lets it through) and refusing ``blocked.test``."""
    (tmp_path / "policy.yaml").write_text(POLICY)
    return Runtime(
        policy=load_policy((tmp_path / "policy.yaml",), set()),
        guard=Guard([ipaddress.ip_network("127.0.0.1/32")]),
        inventory=StaticInventory([]),
        resolver=cast(Resolver, NoNames()),
    )


class LiveHub(FakeHub):
    """A FakeHub on the running loop with the gateway's epoll set and a real runtime."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__()
        self.runtime = runtime
        self.loop = asyncio.get_running_loop()
        self.reactor = Reactor(self.loop)
