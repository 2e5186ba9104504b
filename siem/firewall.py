"""Firewall exports: pure formatters for blocklists that firewalls poll or load.

* `to_edl`: an external dynamic list (Palo Alto EDL, FortiGate threat feed, ...): one
  value per line, deduplicated, order kept, no blank or multi-line values.
* `to_nft_set`: an nftables script that atomically replaces the elements of two interval
  sets, ``<set>_v4`` and ``<set>_v6``, in an ``inet`` table (``nft -f`` runs a script as one
  transaction: readers see the old or the new set, never a half-filled one). Overlapping
  networks are merged first, because nft rejects overlapping intervals.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

NFT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,30}$")
NFT_FAMILIES = frozenset({"inet", "ip", "ip6", "bridge", "netdev", "arp"})
NFT_ELEMENTS_PER_LINE = 64


def to_edl(values: Iterable[str]) -> bytes:
    """One value per line (UTF-8), first occurrence kept; a value with a line break is refused."""
    seen: dict[str, None] = {}
    for value in values:
        value = value.strip()
        if not value:
            continue
        if "\n" in value or "\r" in value:
            raise ValueError(f"EDL value contains a line break: {value!r}")
        seen.setdefault(value, None)
    return "".join(f"{v}\n" for v in seen).encode()


def parse_networks(
    values: Iterable[str],
) -> tuple[list[ipaddress.IPv4Network], list[ipaddress.IPv6Network]]:
    """IPs and CIDRs, split by family and collapsed; ValueError names the first bad value."""
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for value in values:
        try:
            net = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise ValueError(f"not an IP address or CIDR: {value!r}") from None
        if isinstance(net, ipaddress.IPv4Network):
            v4.append(net)
        else:
            v6.append(net)
    return list(ipaddress.collapse_addresses(v4)), list(ipaddress.collapse_addresses(v6))


def _element(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def _elements(
    family: str,
    table: str,
    set_name: str,
    nets: list[ipaddress.IPv4Network] | list[ipaddress.IPv6Network],
) -> list[str]:
    lines = []
    items = [_element(n) for n in nets]
    for i in range(0, len(items), NFT_ELEMENTS_PER_LINE):
        chunk = ", ".join(items[i : i + NFT_ELEMENTS_PER_LINE])
        lines.append(f"add element {family} {table} {set_name} {{ {chunk} }}")
    return lines


def to_nft_set(
    table: str, set_name: str, ips_and_cidrs: Iterable[str], *, family: str = "inet"
) -> str:
    """An nft script that creates the table and sets if needed and replaces their elements."""
    for name in (table, set_name):
        if not NFT_NAME.match(name):
            raise ValueError(f"invalid nftables name {name!r}")
    if family not in NFT_FAMILIES:
        raise ValueError(f"invalid nftables family {family!r}")
    v4, v6 = parse_networks(ips_and_cidrs)
    s4, s6 = f"{set_name}_v4", f"{set_name}_v6"
    lines = [
        "#!/usr/sbin/nft -f",
        f"# {len(v4)} IPv4 and {len(v6)} IPv6 entries; loaded as one transaction",
        f"table {family} {table} {{",
        f"  set {s4} {{ type ipv4_addr; flags interval; }}",
        f"  set {s6} {{ type ipv6_addr; flags interval; }}",
        "}",
        f"flush set {family} {table} {s4}",
        f"flush set {family} {table} {s6}",
    ]
    lines += _elements(family, table, s4, v4)
    lines += _elements(family, table, s6, v6)
    return "\n".join(lines) + "\n"
