"""One connection through the gateway, as the checks and the event builder see it."""

from __future__ import annotations

import ipaddress
import itertools
import os
from typing import Any

from egressgw.decision.names import Host
from egressgw.decision.policy import Protocol
from egressgw.decision.verdict import Verdict
from egressgw.identity.workload import UNKNOWN, Credential, Workload

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Flow ids: a random per-process prefix and a counter; unique without a syscall per flow.
_PREFIX = os.urandom(6).hex()
_COUNTER = itertools.count(1)


def _new_flow_ids() -> None:
    # A forked worker would otherwise repeat its parent's ids (and so its event ids): draw a
    # prefix of its own and count from 1 again. Runs once per fork, never per flow.
    global _PREFIX, _COUNTER
    _PREFIX = os.urandom(6).hex()
    _COUNTER = itertools.count(1)


os.register_at_fork(after_in_child=_new_flow_ids)


def new_id(kind: str = "") -> str:
    """A process-unique id from the flows' counter; ``kind`` (e.g. ``d``) marks other records."""
    return f"{_PREFIX}{kind}{next(_COUNTER):08x}"


_IP_TEXT: dict[IPAddress, str] = {}
_IP_TEXT_CACHE = 65536  # addresses repeat; str() of an ipaddress object is not free


def ip_text(ip: IPAddress) -> str:
    """The text form of an address, remembered for the addresses seen most."""
    text = _IP_TEXT.get(ip)
    if text is None:
        if len(_IP_TEXT) >= _IP_TEXT_CACHE:
            _IP_TEXT.clear()
        text = _IP_TEXT[ip] = str(ip)
    return text


class Flow:
    """The facts of one flow, filled in as they become known, and its one ``verdict``.

    Who (source, workload), where (host, port, protocol, SNI, URL, resolved addresses), what the
    feeds said, the verdict, what happened (status, bytes, error, end). Nothing here is derived
    from other fields: the event builder computes what it needs.

    Fields start as class attributes: a flow is created per connection or request and most of
    its fields keep their initial value, so creating one stores five values, not thirty.
    """

    source_text = ""  # ``source_ip`` as the socket reported it (cache key, event field)
    credential: Credential | None = None  # what the client presented (Proxy-Authorization)
    workload: Workload = UNKNOWN
    host: Host | None = None
    port = 0
    protocol: Protocol = "tcp"
    method: str | None = None
    url: str | None = None
    sni: str | None = None
    # A transparent flow's name, bound to its address (SNI, Host, or the name the client's DNS
    # answer gave): what policy judged, while ``host`` stays the original address.
    bound_name: str | None = None
    ip: IPAddress | None = None  # the destination address connected to
    ip_str = ""  # ``ip`` as text, once known (the socket and both events need it)
    resolved: tuple[IPAddress, ...] = ()
    cnames: tuple[str, ...] = ()
    verdict: Verdict | None = None  # None until decided
    name_threats: tuple[Any, ...] = ()  # feed matches of the names (host, CNAMEs, SNI, URL)
    threats: tuple[Any, ...] = ()  # every feed match: names and addresses
    status: int | None = None  # the HTTP status the gateway answered or forwarded
    bytes_out = 0  # client -> destination
    bytes_in = 0  # destination -> client
    ended_mono: float | None = None
    error: str | None = None
    # What the events consumer recorded of the decision (record.events.to_common): the end event
    # reuses the parts that do not change instead of building them twice.
    event_common: dict[str, Any] | None = None
    # Where the egress map counted the decision (record.egressmap): the end adds its bytes there
    # without looking the edge up again while the bucket is the same.
    map_counters: list[int] | None = None
    map_bucket = -1

    def __init__(
        self,
        source_ip: IPAddress,
        source_port: int,
        started: float,  # wall clock, seconds since the epoch
        started_mono: float,
    ) -> None:
        self.source_ip = source_ip
        self.source_port = source_port
        self.started = started
        self.started_mono = started_mono
        # Process-unique, and globally unlikely to collide (the prefix is random).
        self.id = f"{_PREFIX}{next(_COUNTER):08x}"

    def __repr__(self) -> str:
        return f"Flow({self.id} {self.source_text or self.source_ip} -> {self.host}:{self.port})"
