"""Egress source addresses (``egress_ips``): which local address a workload's connections use.

Pure. ``egress_source(workload, egress_ips)`` is the address of the workload's namespace, or
None (the kernel's choice: the node's own address) for a namespace not listed and for an
unknown source. The dialer (``net.dial``) binds the address it is given; the gateway checks at
start that every configured address is one of this node's (``app``), and is not ready otherwise.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from egressgw.identity.workload import Workload

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def egress_source(w: Workload, egress_ips: Mapping[str, IPAddress]) -> str | None:
    """The source address for ``w``'s outbound connections, as text, or None."""
    if w.namespace is None:
        return None
    ip = egress_ips.get(w.namespace)
    return str(ip) if ip is not None else None
