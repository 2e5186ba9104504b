"""The decision path of one flow: resolve, guard, threat feeds, policy -> Verdict.

Order (every step can refuse; the first refusal is the reason):

1. The destination name is matched against the feeds before it is resolved.
2. The name is resolved once (A and AAAA, CNAME chain); every name in the chain is matched too.
3. Every resolved address is checked by the guard; one guarded address refuses the flow.
4. Every resolved address is matched against the feeds.
5. Policy decides for each address in turn, knowing which feeds matched; the flow goes to the first
   address policy allows, so no address policy refused is ever connected to.

A reason names the verdict, what decided it and who went where: ``denied by policy default (no
rule allows payments/api -> api.example:443)``.

Inputs and their versions. A decision depends on five inputs; each has a version, and a cached
result is used only while every version it was computed with is current:

- policy and guard: fixed for the life of a ``Runtime`` (a reload builds a new one, with empty
  caches), so the Runtime itself is their version;
- threat source and inventory: long-lived ``Services`` whose content changes in place (a feed
  update swaps the matcher, a Kubernetes watch moves pods); each carries a ``generation`` that
  changes with its content;
- the DNS answer: the resolver hands out one immutable answer object per name and TTL, so the
  object is its version (the outcome key holds its ``id()``, and the cached outcome holds the
  object, so no other object can take that id while the entry lives).

Two caches:

- policy decisions per (workload, destination): policy is a pure function of those two values
  (the feeds that matched are part of the destination), so only the policy's version matters;
- whole outcomes of flows per (source address, requested host, port, protocol, DNS answer
  object): a client opening the same tunnel, or asking the same host again, replays the outcome
  instead of running identity, feeds, guard and policy again. A URL a feed lists is never
  replayed. The outcomes are stamped with the (threat source, inventory) generations they were
  decided under; a flow that finds either moved starts a new, empty dict before looking up.

Why one stamp per cache rather than one per entry: the check is a single tuple comparison per
flow, the same work on a hit and a miss, and a change drops every stale outcome at once instead
of leaving them to fill the cache; feeds and pods change every few seconds at the most while
flows arrive by the thousand per second, so refilling after a change costs nothing that shows.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from egressgw.decision.guard import Guard, effective_ip
from egressgw.decision.policy import Decision, Destination, Policy
from egressgw.decision.policy import Protocol as FlowProtocol
from egressgw.decision.verdict import Verdict
from egressgw.flow import Flow, ip_text
from egressgw.identity.workload import Inventory, Peer, Workload
from egressgw.resolver import Resolution, ResolveError, Resolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_DECISION_CACHE = 100_000
DEFAULT_OUTCOME_CACHE = 65_536


class ThreatSource(Protocol):
    """Feed matching as the gateway uses it; each match is an ECS-ready dict."""

    # Changes whenever the matches could change (the outcome cache is valid for one value).
    generation: int

    def match_name(self, name: str) -> tuple[dict[str, Any], ...]:
        """Matches for a domain name (and its parents, per feed)."""
        ...

    def match_ip(self, ip: IPAddress) -> tuple[dict[str, Any], ...]:
        """Matches for an address."""
        ...

    def match_url(self, url: str) -> tuple[dict[str, Any], ...]:
        """Matches for a plain-HTTP URL."""
        ...


class NoThreats:
    """The threat source when no feed is configured."""

    generation = 0

    def match_name(self, name: str) -> tuple[dict[str, Any], ...]:
        """Nothing is listed."""
        return ()

    def match_ip(self, ip: IPAddress) -> tuple[dict[str, Any], ...]:
        """Nothing is listed."""
        return ()

    def match_url(self, url: str) -> tuple[dict[str, Any], ...]:
        """Nothing is listed."""
        return ()


@dataclass(frozen=True, eq=False)
class Services:
    """The decision path's long-lived inputs: kept across reloads, each versioned on its own.

    The resolver (and its cache) is replaced only when its settings change; the inventory and the
    threat source change in place and say so with their ``generation``.
    """

    resolver: Resolver
    inventory: Inventory
    threats: ThreatSource = field(default_factory=NoThreats)


@dataclass(eq=False)
class Runtime:
    """One configuration's policy and guard over the process's services, with the caches of both.

    Replaced whole on reload, never mutated in place: policy and guard are fixed for its life.
    """

    policy: Policy
    guard: Guard
    inventory: Inventory
    resolver: Resolver
    threats: ThreatSource = field(default_factory=NoThreats)
    cache_size: int = DEFAULT_DECISION_CACHE
    outcome_cache_size: int = DEFAULT_OUTCOME_CACHE
    _cache: dict[tuple[Any, ...], Decision] = field(default_factory=dict)
    _outcomes: dict[tuple[Any, ...], Outcome] = field(default_factory=dict)
    # The (threat source, inventory) generations every entry of _outcomes was decided under.
    _inputs: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self._inputs = (self.threats.generation, self.inventory.generation)

    @classmethod
    def over(cls, services: Services, policy: Policy, guard: Guard) -> Runtime:
        """A runtime deciding with ``policy`` and ``guard`` over long-lived ``services``."""
        return cls(policy, guard, services.inventory, services.resolver, services.threats)

    @property
    def services(self) -> Services:
        """The long-lived services this runtime decides over."""
        return Services(self.resolver, self.inventory, self.threats)

    def decide(self, w: Workload, d: Destination) -> Decision:
        """Policy's decision, from the cache when this workload met this destination before."""
        key = (w, d)
        found = self._cache.get(key)
        if found is None:
            found = self.policy.decide(w, d)
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            self._cache[key] = found
        return found


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the decision path wrote into a flow, kept to be replayed onto an identical flow."""

    # Held so that no other object takes its id() (part of the key) while the entry lives.
    resolution: Resolution | ResolveError | None
    verdict: Verdict
    workload: Workload
    resolved: tuple[IPAddress, ...]
    cnames: tuple[str, ...]
    name_threats: tuple[Any, ...]
    threats: tuple[Any, ...]
    ip: IPAddress | None
    ip_str: str

    @classmethod
    def of(cls, flow: Flow, resolution: Resolution | ResolveError | None, v: Verdict) -> Outcome:
        """Snapshot a freshly decided flow."""
        return cls(
            resolution,
            v,
            flow.workload,
            flow.resolved,
            flow.cnames,
            flow.name_threats,
            flow.threats,
            flow.ip,
            ip_text(flow.ip) if flow.ip is not None else "",
        )

    def replay(self, flow: Flow) -> Verdict:
        """Write the outcome into a new flow with the same inputs."""
        flow.workload = self.workload
        flow.resolved = self.resolved
        flow.cnames = self.cnames
        flow.name_threats = self.name_threats
        flow.threats = self.threats
        flow.verdict = verdict = self.verdict
        flow.ip = self.ip
        flow.ip_str = self.ip_str
        return verdict


def _feed_names(threats: Sequence[dict[str, Any]]) -> frozenset[str]:
    return frozenset(t["feed"] for t in threats)


def _deny(flow: Flow, decision: Decision | None, reason: str, status: int = 403) -> Verdict:
    flow.verdict = verdict = Verdict.deny(reason, status, decision)
    return verdict


def _who(flow: Flow) -> str:
    """The source as a reason names it: ``namespace/app`` (or pod), or the unknown address."""
    w = flow.workload
    if not w.known:
        return f"unknown {flow.source_text or ip_text(flow.source_ip)}"
    labels = w.label_map
    app = labels.get("app.kubernetes.io/name") or labels.get("app") or w.pod
    return f"{w.namespace}/{app}" if app else str(w.namespace)


def _where(flow: Flow, name: str | None) -> str:
    """The destination as policy judged it: its name (or the address) and port."""
    if name is None:
        ip = flow.ip
        if ip is None:
            return f"?:{flow.port}"
        name = f"[{ip_text(ip)}]" if ip.version == 6 else ip_text(ip)
    return f"{name}:{flow.port}"


def _policy_reason(decision: Decision, flow: Flow, name: str | None) -> str:
    """``<allowed|denied> by <rule>[: what a feed listed] (<who> -> <where>)``."""
    verdict = "allowed" if decision.action == "allow" else "denied"
    by = "policy default" if decision.tier is None else decision.rule_ref
    reason = f"{verdict} by {by}"
    if decision.action == "deny" and flow.threats:
        t = flow.threats[0]
        reason += f": {t['matched']['atomic']} listed by feed {t['feed']}"
    path = f"{_who(flow)} -> {_where(flow, name)}"
    if decision.rule == "default" and decision.action == "deny":
        return f"{reason} (no rule allows {path})"
    return f"{reason} ({path})"


def decide_addresses(
    rt: Runtime, flow: Flow, ips: Sequence[IPAddress], name: str | None = None
) -> Verdict:
    """Steps 3-5 for addresses already known (resolved, literal, or the tunnel's own).

    Policy judges ``name`` (default: the requested host name) with each address.
    """
    for ip in ips:
        reason = rt.guard.check(ip)
        if reason is not None:
            flow.ip = ip
            return _deny(flow, None, reason)
    threats = list(flow.name_threats)
    for ip in ips:
        threats.extend(rt.threats.match_ip(effective_ip(ip)))
    flow.threats = tuple(threats)
    feeds = _feed_names(threats)
    if name is None and flow.host is not None:
        name = flow.host.name
    first: Decision | None = None
    for ip in ips:
        decision = rt.decide(
            flow.workload, Destination(name, effective_ip(ip), flow.port, flow.protocol, feeds)
        )
        if decision.action == "allow":
            flow.ip = ip
            flow.verdict = verdict = Verdict.allow(
                ip, _policy_reason(decision, flow, name), decision
            )
            return verdict
        first = first or decision
    assert first is not None  # ips is never empty
    flow.ip = ips[0]
    return _deny(flow, first, _policy_reason(first, flow, name))


def check_flow_now(rt: Runtime, flow: Flow, now: float) -> Verdict | None:
    """The decision path without waiting: None when the name must be resolved first.

    Most flows go to addresses or to names whose answer is cached; they are decided here,
    synchronously, with no task. ``now`` is the event loop's clock (for the resolver cache).
    """
    host = flow.host
    assert host is not None
    if host.name is None:
        return _decide_replayed(rt, flow, None)
    cached = rt.resolver.cached(host.name, now)
    if cached is None:
        return None
    return _decide_replayed(rt, flow, cached)


async def check_flow(rt: Runtime, flow: Flow) -> Verdict:
    """Run the whole decision path for a new flow (``flow.host``, port and protocol set)."""
    host = flow.host
    assert host is not None
    if host.name is None:
        return _decide_replayed(rt, flow, None)
    try:
        resolution: Resolution | ResolveError = await rt.resolver.resolve(
            host.name, flow.source_text
        )
    except ResolveError as e:
        resolution = e
    return _decide_replayed(rt, flow, resolution)


class HoldsRuntime(Protocol):
    """Whatever holds the runtime in force (the gateway): a reload replaces its ``runtime``."""

    runtime: Runtime


async def check_flow_latest(holder: HoldsRuntime, flow: Flow) -> Verdict:
    """``check_flow``, decided by the runtime in force once the name is resolved.

    A lookup may outlast a reload: the flow is then decided by the policy after the reload, not
    the one it started under (a reload that refuses a destination refuses flows still waiting).
    """
    host = flow.host
    assert host is not None
    if host.name is None:
        return _decide_replayed(holder.runtime, flow, None)
    try:
        resolver = holder.runtime.resolver
        resolution: Resolution | ResolveError = await resolver.resolve(host.name, flow.source_text)
    except ResolveError as e:
        resolution = e
    return _decide_replayed(holder.runtime, flow, resolution)


def _decide_replayed(
    rt: Runtime, flow: Flow, resolution: Resolution | ResolveError | None
) -> Verdict:
    """``_decide_resolved`` through the outcome cache.

    A URL is not part of the key (nearly every request's is new): a request whose URL no feed
    lists has the outcome of its host, and one whose URL is listed is decided on its own.
    """
    if not flow.source_text or (flow.url is not None and rt.threats.match_url(flow.url)):
        return _decide_resolved(rt, flow, resolution)
    if (rt.threats.generation, rt.inventory.generation) != rt._inputs:
        # A feed or identity change since these outcomes were decided: none may be replayed.
        rt._outcomes = {}
        rt._inputs = (rt.threats.generation, rt.inventory.generation)
    key: tuple[Any, ...] = (flow.source_text, flow.host, flow.port, flow.protocol, id(resolution))
    if flow.credential is not None:
        key += (flow.credential,)  # another credential may be another workload
    found = rt._outcomes.get(key)
    if found is not None:
        return found.replay(flow)
    verdict = _decide_resolved(rt, flow, resolution)
    if len(rt._outcomes) >= rt.outcome_cache_size:
        rt._outcomes.clear()
    rt._outcomes[key] = Outcome.of(flow, resolution, verdict)
    return verdict


def _decide_resolved(
    rt: Runtime, flow: Flow, resolution: Resolution | ResolveError | None
) -> Verdict:
    """Decide once the name's answer is known (None for an address literal)."""
    flow.workload = rt.inventory.lookup(Peer(flow.source_ip, flow.credential))
    host = flow.host
    assert host is not None
    threats: list[dict[str, Any]] = []
    if host.name is not None:
        threats.extend(rt.threats.match_name(host.name))
    if flow.url is not None:
        threats.extend(rt.threats.match_url(flow.url))
    if isinstance(resolution, ResolveError):
        flow.threats = flow.name_threats = tuple(threats)
        if threats:
            return decide_without_address(rt, flow, resolution.reason)
        return _deny(flow, None, str(resolution), status=502)
    if resolution is not None:
        flow.resolved = resolution.ips
        flow.cnames = resolution.chain
        for cname in resolution.chain:
            threats.extend(rt.threats.match_name(cname))
        ips: Sequence[IPAddress] = resolution.ips
    else:
        assert host.ip is not None
        ips = (host.ip,)
    flow.name_threats = tuple(threats)
    return decide_addresses(rt, flow, ips)


def decide_transparent(rt: Runtime, flow: Flow, name: str | None) -> Verdict:
    """Decide a redirected connection to its original address (``flow.host``), judging ``name``.

    ``name`` must already be bound to that address (``decision.binding``): policy then judges
    the name with the address, so a domain rule allows a connection made only by address.
    """
    flow.workload = rt.inventory.lookup(Peer(flow.source_ip, flow.credential))
    host = flow.host
    assert host is not None and host.ip is not None
    flow.bound_name = name
    flow.name_threats = rt.threats.match_name(name) if name is not None else ()
    return decide_addresses(rt, flow, (host.ip,), name=name)


def decide_without_address(rt: Runtime, flow: Flow, dns_reason: str) -> Verdict:
    """A listed name that does not resolve: policy still decides, so the feed match is recorded."""
    assert flow.host is not None
    d = Destination(flow.host.name, None, flow.port, flow.protocol, _feed_names(flow.threats))
    decision = rt.decide(flow.workload, d)
    if decision.action == "deny":
        return _deny(flow, decision, _policy_reason(decision, flow, flow.host.name))
    return _deny(flow, decision, f"dns: {flow.host.name}: {dns_reason}", status=502)


def recheck_tunnel(rt: Runtime, flow: Flow, protocol: FlowProtocol, sni: str | None) -> Verdict:
    """Decide a tunnel again once its first bytes showed the protocol and the SNI it asks for.

    The address stays the one connected to and is never resolved again. The requested name is
    decided again with the real protocol; an SNI naming something else must be allowed too, with
    the same address (so an SNI can refuse a tunnel, never unlock one: CONNECT to an address with
    the SNI of an allowed name gets nothing the address alone would not get).
    """
    assert flow.ip is not None and flow.verdict is not None
    flow.protocol = protocol
    other_sni = sni is not None and (flow.host is None or sni != flow.host.name)
    if not other_sni and not rt.policy.protocol_sensitive:
        return flow.verdict  # nothing the peek showed can matter
    if sni is not None:
        flow.sni = sni
        if other_sni:
            flow.name_threats += rt.threats.match_name(sni)
    if other_sni:
        sni_verdict = decide_addresses(rt, flow, (flow.ip,), name=sni)
        if not sni_verdict.allowed:
            return _deny(flow, sni_verdict.decision, f"TLS server name {sni}: {sni_verdict.reason}")
    # Decided last so the flow records the requested name's rule.
    return decide_addresses(rt, flow, (flow.ip,))


async def explain_flow(rt: Runtime, flow: Flow) -> tuple[Verdict, list[str]]:
    """Decide a new flow as ``check_flow`` does and say how, step by step (``egressgw explain``)."""
    verdict = await check_flow(rt, flow)
    host = flow.host
    assert host is not None
    w = flow.workload
    who = f"namespace {w.namespace}, pod {w.pod}, labels {dict(w.labels)}" if w.known else "unknown"
    lines = [
        f"source:      {flow.source_ip} -> {who}",
        f"destination: {host}:{flow.port} ({flow.protocol})",
    ]
    if flow.resolved:
        lines.append(f"resolved:    {', '.join(map(str, flow.resolved))}")
    if flow.cnames:
        lines.append(f"cname chain: {' -> '.join(flow.cnames)}")
    for t in flow.threats:
        lines.append(f"feed match:  {t['feed']}: {t['matched']['atomic']}")
    d = verdict.decision
    if d is not None:
        ip = effective_ip(flow.ip) if flow.ip is not None else None
        traced = rt.policy.decide(
            w,
            Destination(host.name, ip, flow.port, flow.protocol, _feed_names(flow.threats)),
            trace=True,
        )
        lines.append("steps:")
        lines.extend(f"  {s}" for s in traced.steps)
        if d.audits:
            lines.append(f"audit:       {'; '.join(d.audits)}")
    lines.append(
        f"decision:    {'ALLOW' if verdict.allowed else 'DENY'} "
        f"({d.rule_source if d is not None else 'no rule'}): {verdict.reason}"
    )
    return verdict, lines
