"""Tests of the decision path (resolution, guard, feeds, policy) with a stand-in resolver."""

import ipaddress
from pathlib import Path
from typing import Any, cast

import pytest

from egressgw.config.model import load_policy
from egressgw.decision.guard import Guard
from egressgw.decision.names import parse_host
from egressgw.decision.path import Runtime, check_flow, recheck_tunnel
from egressgw.flow import Flow
from egressgw.identity.static import StaticInventory
from egressgw.identity.workload import Credential, Peer, Workload
from egressgw.resolver import Resolution, ResolveError, Resolver

POLICY = """\
default: deny
tiers:
  - name: security
    rules:
      - name: block-feeds
        action: deny
        to: {feeds: ["*"]}
      - name: no-raw-tcp-to-web
        action: deny
        to: {domains: ["web.test"], protocols: [tcp]}
      - name: not-that-one
        action: deny
        to: {cidrs: ["198.51.100.1/32"]}
  - name: apps
    rules:
      - name: web
        action: allow
        to: {domains: ["web.test", "multi.test", "alias.test"]}
      - name: by-address
        action: allow
        to: {cidrs: ["203.0.113.0/24"]}
"""
NAMES = {
    "web.test": Resolution("web.test", (ipaddress.ip_address("192.0.2.10"),), (), 60),
    "multi.test": Resolution(
        "multi.test",
        (ipaddress.ip_address("198.51.100.1"), ipaddress.ip_address("198.51.100.2")),
        (),
        60,
    ),
    "alias.test": Resolution(
        "alias.test", (ipaddress.ip_address("192.0.2.11"),), ("cdn.evil.test",), 60
    ),
    "rebind.test": Resolution(
        "rebind.test",
        (ipaddress.ip_address("192.0.2.12"), ipaddress.ip_address("169.254.169.254")),
        (),
        60,
    ),
}


class StandInResolver:
    """Answers from NAMES; anything else does not exist (one error object per name, as cached)."""

    def __init__(self) -> None:
        self.errors: dict[str, ResolveError] = {}

    async def resolve(self, name: str, source: str | None = None) -> Resolution:
        """The stored answer, or 'no such name'."""
        if name in NAMES:
            return NAMES[name]
        raise self.errors.setdefault(name, ResolveError(name, "no such name"))


class StandInThreats:
    """evil.test and everything below it, and 192.0.2.66, are listed by feed 'intel'."""

    generation = 0

    def _hit(self, atomic: str) -> tuple[dict[str, Any], ...]:
        return ({"feed": "intel", "indicator": {}, "matched": {"atomic": atomic}},)

    def match_name(self, name: str) -> tuple[dict[str, Any], ...]:
        """Suffix match on evil.test."""
        return self._hit(name) if name == "evil.test" or name.endswith(".evil.test") else ()

    def match_ip(self, ip: Any) -> tuple[dict[str, Any], ...]:
        """One listed address."""
        return self._hit(str(ip)) if str(ip) == "192.0.2.66" else ()

    def match_url(self, url: str) -> tuple[dict[str, Any], ...]:
        """No URLs listed."""
        return ()


@pytest.fixture
def rt(tmp_path: Path) -> Runtime:
    """A runtime with the policy above, the guard on, and the stand-ins."""
    (tmp_path / "p.yaml").write_text(POLICY)
    return Runtime(
        policy=load_policy((tmp_path / "p.yaml",), {"intel"}),
        guard=Guard(),
        inventory=StaticInventory([(ipaddress.ip_network("10.0.0.0/24"), Workload.make("ns"))]),
        resolver=cast(Resolver, StandInResolver()),
        threats=StandInThreats(),
    )


def flow_to(host: str, port: int = 443, protocol: Any = "tls") -> Flow:
    """A flow from 10.0.0.5 to host:port."""
    f = Flow(ipaddress.ip_address("10.0.0.5"), 50000, 0.0, 0.0)
    f.host = parse_host(host)
    f.port, f.protocol = port, protocol
    return f


async def test_allowed_name_connects_to_its_address(rt: Runtime) -> None:
    """An allowed name goes to the address it resolved to, decided by apps/web."""
    f = flow_to("web.test")
    v = await check_flow(rt, f)
    assert v.allowed and str(v.ip) == "192.0.2.10"
    assert f.workload.namespace == "ns" and f.verdict.decision is not None
    assert f.verdict.decision.rule_ref == "apps/web"


async def test_policy_picks_an_allowed_address(rt: Runtime) -> None:
    """Of two resolved addresses the one a deny rule names is never used."""
    v = await check_flow(rt, flow_to("multi.test"))
    assert v.allowed and str(v.ip) == "198.51.100.2"


async def test_one_guarded_address_refuses_the_name(rt: Runtime) -> None:
    """A name with a metadata address among its answers is refused by the guard."""
    v = await check_flow(rt, flow_to("rebind.test"))
    assert not v.allowed and v.reason == "guard: 169.254.169.254 is cloud-metadata"


async def test_cname_chain_is_matched(rt: Runtime) -> None:
    """A CNAME to a listed name is refused by the feed rule, naming feed and name."""
    f = flow_to("alias.test")
    v = await check_flow(rt, f)
    assert not v.allowed and v.status == 403
    assert v.reason == (
        "denied by security/block-feeds: cdn.evil.test listed by feed intel (ns -> alias.test:443)"
    )


async def test_listed_name_that_does_not_resolve_is_still_refused_by_feed(rt: Runtime) -> None:
    """A listed name is refused (403 by policy), not reported as a DNS failure."""
    v = await check_flow(rt, flow_to("gone.evil.test"))
    assert (v.allowed, v.status) == (False, 403)
    assert "security/block-feeds" in v.reason


async def test_unknown_name_is_502(rt: Runtime) -> None:
    """An unresolvable, unlisted name is a 502 with the DNS reason."""
    v = await check_flow(rt, flow_to("nowhere.test"))
    assert (v.allowed, v.status, v.reason) == (False, 502, "dns: nowhere.test: no such name")


async def test_sni_can_refuse_but_not_unlock(rt: Runtime) -> None:
    """A tunnel to an allowed name with the SNI of a listed name is refused after the peek."""
    f = flow_to("web.test")
    assert (await check_flow(rt, f)).allowed
    v = recheck_tunnel(rt, f, "tls", "x.evil.test")
    assert not v.allowed and v.reason.startswith("TLS server name x.evil.test: ")


async def test_sni_of_an_allowed_name_does_not_unlock_an_address(rt: Runtime) -> None:
    """CONNECT to an address no rule allows stays refused whatever SNI follows."""
    f = flow_to("192.0.2.200")
    assert not (await check_flow(rt, f)).allowed
    f2 = flow_to("203.0.113.9")
    assert (await check_flow(rt, f2)).allowed
    v = recheck_tunnel(rt, f2, "tls", "web.test")
    assert (
        v.allowed
        and f2.verdict.decision is not None
        and f2.verdict.decision.rule_ref == "apps/by-address"
    )


async def test_plain_tcp_tunnel_is_decided_again(rt: Runtime) -> None:
    """A tunnel whose first bytes are not TLS is decided as tcp (and refused here)."""
    f = flow_to("web.test")
    assert (await check_flow(rt, f)).allowed
    v = recheck_tunnel(rt, f, "tcp", None)
    assert not v.allowed and v.reason == "denied by security/no-raw-tcp-to-web (ns -> web.test:443)"


def _outcome(f: Flow) -> tuple[object, ...]:
    return (f.workload, f.verdict, f.ip, f.threats, f.resolved, f.cnames)


@pytest.mark.parametrize(
    ("host", "port", "protocol"),
    [
        ("web.test", 443, "tls"),
        ("web.test", 443, "tcp"),
        ("multi.test", 443, "tls"),
        ("alias.test", 443, "tls"),
        ("rebind.test", 443, "tls"),
        ("missing.test", 443, "tls"),
        ("203.0.113.9", 8443, "tls"),
    ],
)
async def test_a_replayed_outcome_equals_a_fresh_decision(
    rt: Runtime, tmp_path: Path, host: str, port: int, protocol: Any
) -> None:
    """The second identical tunnel is replayed from the cache and ends exactly as the first."""
    first, again = flow_to(host, port, protocol), flow_to(host, port, protocol)
    first.source_text = again.source_text = "10.0.0.5"
    v1 = await check_flow(rt, first)
    v2 = await check_flow(rt, again)
    assert len(rt._outcomes) == 1  # one decision, one replay
    assert v2 == v1 and _outcome(again) == _outcome(first)
    fresh = flow_to(host, port, protocol)
    assert await check_flow(rt_like(rt), fresh) == v1 and _outcome(fresh) == _outcome(first)


def rt_like(rt: Runtime) -> Runtime:
    """The same inputs, empty caches."""
    return Runtime(rt.policy, rt.guard, rt.inventory, rt.resolver, rt.threats)


async def test_outcomes_are_kept_per_source_port_and_protocol(rt: Runtime) -> None:
    """Another client, port or protocol is decided on its own, never replayed from a neighbour."""
    flows = [flow_to("web.test"), flow_to("web.test", 8443), flow_to("web.test", 443, "tcp")]
    stranger = flow_to("web.test")
    stranger.source_ip = ipaddress.ip_address("10.9.9.9")
    for f in [*flows, stranger]:
        f.source_text = str(f.source_ip)
        await check_flow(rt, f)
    assert len(rt._outcomes) == 4
    assert flows[2].verdict.action == "connection_denied"  # raw TCP to web.test is refused
    assert stranger.workload.namespace is None and flows[0].workload.namespace == "ns"


class ListsOneUrl(StandInThreats):
    """Also lists one URL on web.test."""

    def match_url(self, url: str) -> tuple[dict[str, Any], ...]:
        """http://web.test/bad only."""
        return self._hit(url) if url == "http://web.test/bad" else ()


async def test_requests_share_their_hosts_outcome_unless_the_url_is_listed(rt: Runtime) -> None:
    """Two clean URLs on one host: one decision; a listed URL on it is refused, never replayed."""
    rt = Runtime(rt.policy, rt.guard, rt.inventory, rt.resolver, ListsOneUrl())
    verdicts = []
    for url in ["http://web.test/a", "http://web.test/b", "http://web.test/bad"]:
        f = flow_to("web.test", 80, "http")
        f.source_text, f.url = "10.0.0.5", url
        verdicts.append((await check_flow(rt, f), f))
    assert [v.allowed for v, _ in verdicts] == [True, True, False]
    assert len(rt._outcomes) == 1
    denied = verdicts[2][1]
    assert (
        denied.verdict.decision is not None
        and denied.verdict.decision.rule_ref == "security/block-feeds"
    )
    assert denied.threats and denied.threats[0]["matched"]["atomic"] == "http://web.test/bad"


class Relisting(StandInThreats):
    """The stand-in feeds, plus addresses a feed update lists later (the generation moves)."""

    def __init__(self) -> None:
        self.listed: set[str] = set()
        self.generation = 0

    def list_ip(self, ip: str) -> None:
        """A feed update starts listing ``ip``."""
        self.listed = self.listed | {ip}
        self.generation += 1

    def match_ip(self, ip: Any) -> tuple[dict[str, Any], ...]:
        """The stand-in's address, and those listed since."""
        return self._hit(str(ip)) if str(ip) in self.listed else super().match_ip(ip)


def from_cached_source(host: str, port: int = 443) -> Flow:
    """A flow to host:port from 10.0.0.5 as the proxy makes it: with source_text, so cached."""
    f = flow_to(host, port)
    f.source_text = "10.0.0.5"
    return f


async def test_a_feed_listing_a_cached_address_refuses_the_very_next_flow(rt: Runtime) -> None:
    """An address a feed starts listing is refused at once, though its outcome was cached."""
    threats = Relisting()
    rt = Runtime(rt.policy, rt.guard, rt.inventory, rt.resolver, threats)
    for _ in range(2):  # decided, then replayed
        assert (await check_flow(rt, from_cached_source("203.0.113.9", 8443))).allowed
    threats.list_ip("203.0.113.9")
    f = from_cached_source("203.0.113.9", 8443)
    v = await check_flow(rt, f)
    assert not v.allowed and v.reason == (
        "denied by security/block-feeds: 203.0.113.9 listed by feed intel (ns -> 203.0.113.9:8443)"
    )
    assert f.verdict.decision is not None and f.verdict.decision.rule_ref == "security/block-feeds"


async def test_outcomes_are_kept_while_no_input_changes(rt: Runtime, tmp_path: Path) -> None:
    """Without a feed or identity change, the same flow is replayed, never decided again."""
    await check_flow(rt, from_cached_source("web.test"))
    (tmp_path / "deny.yaml").write_text("default: deny\ntiers: []\n")
    rt.policy = load_policy((tmp_path / "deny.yaml",), set())  # not a reload: shows the replay
    assert (await check_flow(rt, from_cached_source("web.test"))).allowed


PER_NAMESPACE = """\
default: deny
tiers:
  - name: apps
    rules:
      - name: payments-web
        action: allow
        from: {namespace: payments}
        to: {domains: ["web.test"]}
"""
HERE = ipaddress.ip_network("10.0.0.0/24")


class WatchedInventory:
    """An inventory changed in place, as a Kubernetes watch changes it: pods move."""

    def __init__(self, workloads: dict[str, Workload]) -> None:
        self.workloads = dict(workloads)
        self.generation = 0

    def move(self, ip: str, workload: Workload) -> None:
        """The address now belongs to another pod."""
        self.workloads[ip] = workload
        self.generation += 1

    def lookup(self, peer: Peer) -> Workload:
        """The workload at the peer's address, or UNKNOWN."""
        return self.workloads.get(str(peer.ip), Workload())


class TokenInventory:
    """An inventory that knows workloads by the token they present (verified identity)."""

    generation = 0

    def lookup(self, peer: Peer) -> Workload:
        """The workload whose token the peer presented, else UNKNOWN."""
        if peer.credential is not None and peer.credential.value == "payments-token":
            return Workload.make("payments")
        return Workload()


async def test_a_credential_decides_the_workload_and_keys_the_outcome(
    rt: Runtime, tmp_path: Path
) -> None:
    """Two flows from one address with other credentials are different workloads, never replayed."""
    (tmp_path / "p.yaml").write_text(PER_NAMESPACE)
    rt = Runtime(load_policy((tmp_path / "p.yaml",), set()), Guard(), TokenInventory(), rt.resolver)
    with_token = from_cached_source("web.test")
    with_token.credential = Credential("bearer", "payments-token")
    assert (await check_flow(rt, with_token)).allowed
    assert with_token.workload.namespace == "payments"
    without = from_cached_source("web.test")
    assert not (await check_flow(rt, without)).allowed
    assert not without.workload.known


@pytest.mark.parametrize("kind", ["watched", "static"])
async def test_a_source_moved_to_another_workload_is_decided_as_that_one(
    rt: Runtime, tmp_path: Path, kind: str
) -> None:
    """After an inventory change the very next flow from the address follows its new workload."""
    (tmp_path / "ns.yaml").write_text(PER_NAMESPACE)
    payments, batch = Workload.make("payments", labels={"app": "api"}), Workload.make("batch")
    watched = WatchedInventory({"10.0.0.5": payments})
    static = StaticInventory([(HERE, payments)])
    inventory: Any = watched if kind == "watched" else static
    policy = load_policy((tmp_path / "ns.yaml",), set())
    rt = Runtime(policy, rt.guard, inventory, rt.resolver, rt.threats)
    for _ in range(2):  # decided, then replayed
        assert (await check_flow(rt, from_cached_source("web.test"))).allowed
    if kind == "watched":
        watched.move("10.0.0.5", batch)
    else:
        static.update([(HERE, batch)])
    f = from_cached_source("web.test")
    v = await check_flow(rt, f)
    assert f.workload.namespace == "batch"
    assert not v.allowed
    assert v.reason == "denied by policy default (no rule allows batch -> web.test:443)"


def test_static_inventory_update_replaces_entries_and_moves_the_generation() -> None:
    """update() answers from the new entries only (no stale lookup cache) and bumps generation."""
    inv = StaticInventory([(HERE, Workload.make("a"))])
    ip = ipaddress.ip_address("10.0.0.5")
    assert inv.lookup(Peer(ip)).namespace == "a" and inv.generation == 0
    inv.update([(ipaddress.ip_network("10.0.0.0/25"), Workload.make("b"))])
    assert inv.lookup(Peer(ip)).namespace == "b" and inv.generation == 1
    inv.update([])
    assert not inv.lookup(Peer(ip)).known and inv.generation == 2


async def test_a_reloaded_policy_decides_the_very_next_flow(rt: Runtime, tmp_path: Path) -> None:
    """A runtime with a new policy over the same services refuses what the old one allowed."""
    assert (await check_flow(rt, from_cached_source("web.test"))).allowed
    (tmp_path / "deny.yaml").write_text("default: deny\ntiers: []\n")
    reloaded = Runtime.over(rt.services, load_policy((tmp_path / "deny.yaml",), set()), rt.guard)
    assert reloaded.resolver is rt.resolver and reloaded.inventory is rt.inventory
    v = await check_flow(reloaded, from_cached_source("web.test"))
    assert not v.allowed
    assert v.reason == "denied by policy default (no rule allows ns -> web.test:443)"


async def test_a_changed_guard_decides_the_very_next_flow(rt: Runtime) -> None:
    """A runtime whose guard exempts an address lets policy decide it; the old one refused it."""
    v = await check_flow(rt, from_cached_source("rebind.test"))
    assert v.reason == "guard: 169.254.169.254 is cloud-metadata"
    exempt = Guard(allow=[ipaddress.ip_network("169.254.169.254/32")])
    v = await check_flow(
        Runtime.over(rt.services, rt.policy, exempt), from_cached_source("rebind.test")
    )
    assert not v.allowed
    assert v.reason == "denied by policy default (no rule allows ns -> rebind.test:443)"


async def test_reasons_name_the_verdict_the_source_and_the_destination(rt: Runtime) -> None:
    """Allowed and refused flows say by what, from whom and to where (addresses too)."""
    assert (
        await check_flow(rt, flow_to("web.test"))
    ).reason == "allowed by apps/web (ns -> web.test:443)"
    v6 = flow_to("[2001:db8::1]", 8443)
    assert (await check_flow(rt, v6)).reason == (
        "denied by policy default (no rule allows ns -> [2001:db8::1]:8443)"
    )
    stranger = flow_to("192.0.2.200", 80)
    stranger.source_ip = ipaddress.ip_address("10.9.9.9")
    assert (await check_flow(rt, stranger)).reason == (
        "denied by policy default (no rule allows unknown 10.9.9.9 -> 192.0.2.200:80)"
    )
