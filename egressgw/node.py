"""The per-node nftables rules: node settings in, an ``nft -f`` script out. Pure.

Everything lives in one table of its own (``inet egressgw`` by default), so nothing else on the
node is touched and teardown is one ``delete table``. Each script is one ``nft -f`` run, which
nft applies as one transaction: the node has the old rules or the new, never half of them.

The table (``to_setup_script``):

- ``prerouting`` (nat, dstnat priority), for traffic from the pods (``pod_cidrs`` sources or
  packets arriving on ``interfaces``), in this order:
  1. packets carrying ``exempt_mark`` return first: the gateway's own sockets are never
     redirected to itself;
  2. DNS, UDP and TCP port 53, is redirected to the DNS proxy's port;
  3. destinations in ``exclude_cidrs`` (and the pod CIDRs themselves: pod to pod) return;
  4. any other TCP is redirected to the transparent listener's port.
  A port that is not configured (no ``dns.listen``, no ``transparent.listen``) gets no rule.
- ``forward`` (filter): traffic to an address in the sets ``blocked_v4``/``blocked_v6`` (the
  feeds' blocklisted IPs and CIDRs, loaded by ``siem.firewall.to_nft_set``) is counted and
  dropped, whatever its protocol: UDP and everything else that no proxy sees.

Setup is idempotent: it adds what is missing and replaces the chains' rules, and keeps the sets'
elements (the feeds refresh those on their own schedule). Teardown creates the table before
deleting it, so it succeeds whether or not the rules were installed.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
NFT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,30}$")
INTERFACE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
BLOCKED_SET = "blocked"  # the sets are blocked_v4 and blocked_v6 (as `firewall nft` names them)
DNS_PORT = 53


@dataclass(frozen=True, slots=True)
class NodeRules:
    """What the node's rules are made of."""

    table: str
    pod_cidrs: tuple[IPNetwork, ...]
    interfaces: tuple[str, ...]
    exempt_mark: int
    dns_port: int | None = None  # the DNS proxy's port, if it runs
    tcp_port: int | None = None  # the transparent listener's port, if configured
    exclude_cidrs: tuple[IPNetwork, ...] = ()

    def __post_init__(self) -> None:
        if not NFT_NAME.match(self.table):
            raise ValueError(f"invalid nftables table name {self.table!r}")
        for name in self.interfaces:
            if not INTERFACE.match(name):
                raise ValueError(f"invalid interface name {name!r}")
        if not (self.pod_cidrs or self.interfaces):
            raise ValueError("node.pod_cidrs or node.interfaces must name the pods' traffic")


def _sources(rules: NodeRules) -> list[str]:
    """One match per source selector: ``ip saddr {...}``, ``ip6 saddr {...}``, ``iifname "x"``."""
    out = []
    v4 = [str(n) for n in rules.pod_cidrs if n.version == 4]
    v6 = [str(n) for n in rules.pod_cidrs if n.version == 6]
    if v4:
        out.append(f"ip saddr {{ {', '.join(v4)} }}")
    if v6:
        out.append(f"ip6 saddr {{ {', '.join(v6)} }}")
    out += [f'iifname "{name}"' for name in rules.interfaces]
    return out


def _excluded(rules: NodeRules) -> list[str]:
    nets = [*rules.pod_cidrs, *rules.exclude_cidrs]
    out = []
    for version, key in ((4, "ip"), (6, "ip6")):
        chosen = [str(n) for n in nets if n.version == version]
        if chosen:
            out.append(f"{key} daddr {{ {', '.join(chosen)} }} return")
    return out


def to_setup_script(rules: NodeRules) -> str:
    """The script that installs (or brings up to date) the node's table; see the module doc."""
    t = f"inet {rules.table}"
    lines = [
        "#!/usr/sbin/nft -f",
        f"# egressgw node rules; one transaction; teardown: delete table {t}",
        f"add table {t}",
        f"add set {t} {BLOCKED_SET}_v4 {{ type ipv4_addr; flags interval; }}",
        f"add set {t} {BLOCKED_SET}_v6 {{ type ipv6_addr; flags interval; }}",
        f"add chain {t} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}",
        f"flush chain {t} prerouting",
        f"add rule {t} prerouting meta mark {rules.exempt_mark:#x} return",
    ]
    sources = _sources(rules)
    if rules.dns_port is not None:
        for src in sources:
            for proto in ("udp", "tcp"):
                lines.append(
                    f"add rule {t} prerouting {src} {proto} dport {DNS_PORT} "
                    f"redirect to :{rules.dns_port}"
                )
    if rules.tcp_port is not None:
        lines += [f"add rule {t} prerouting {match}" for match in _excluded(rules)]
        for src in sources:
            lines.append(
                f"add rule {t} prerouting {src} meta l4proto tcp redirect to :{rules.tcp_port}"
            )
    lines += [
        f"add chain {t} forward {{ type filter hook forward priority filter; policy accept; }}",
        f"flush chain {t} forward",
        f"add rule {t} forward meta mark {rules.exempt_mark:#x} return",
        f"add rule {t} forward ip daddr @{BLOCKED_SET}_v4 counter drop",
        f"add rule {t} forward ip6 daddr @{BLOCKED_SET}_v6 counter drop",
    ]
    return "\n".join(lines) + "\n"


def to_teardown_script(table: str) -> str:
    """The script that removes the node's table, installed or not."""
    if not NFT_NAME.match(table):
        raise ValueError(f"invalid nftables table name {table!r}")
    return f"add table inet {table}\ndelete table inet {table}\n"


def summarise(listing: str) -> list[str]:
    """What ``nft list table`` shows, in a few lines: chains with rule counts, set sizes."""
    out = []
    chain: str | None = None
    in_set: str | None = None
    rules = elements = 0
    collecting = False
    for raw in listing.splitlines():
        line = raw.strip()
        if line.startswith("chain "):
            chain, rules = line.split()[1], 0
        elif line.startswith("set "):
            in_set, elements = line.split()[1], 0
        elif line == "}" and chain is not None:
            out.append(f"chain {chain}: {rules} rules")
            chain = None
        elif line == "}" and in_set is not None:
            out.append(f"set {in_set}: {elements} elements")
            in_set, collecting = None, False
        elif chain is not None and line and not line.startswith("type "):
            rules += 1
        elif in_set is not None and (collecting or line.startswith("elements")):
            collecting = not line.endswith("}")
            elements += _count_elements(line)
    return out


def _count_elements(line: str) -> int:
    body = line.partition("{")[2] if "{" in line else line
    return len([v for v in body.replace("}", "").split(",") if v.strip()])
