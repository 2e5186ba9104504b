"""The policy engine: (workload, destination) -> Decision. Pure; no I/O, no clock.

Evaluation order:

1. Tiers in order; within a tier, rules in order.
2. A rule matches when its ``from`` selects the workload and its ``to`` selects the destination.
   Inside ``from`` and ``to`` every given key must match (AND); inside one key any listed value
   may match (OR) — except ``domains`` and ``cidrs``, which together form one address selector:
   the destination matches if its name matches a domain or its IP lies in a CIDR.
3. A matching ``audit: true`` rule records "would <action>" and evaluation goes on as if it had
   not matched; the flow's decision carries every audit record.
4. A matching ``allow`` or ``deny`` decides. A matching ``pass`` ends the tier: evaluation goes on
   with the next tier.
5. A tier whose rules decided nothing applies its own ``default`` (``pass`` unless set).
6. When no tier decided, the policy ``default`` decides (rule name ``default``).

Domains: ``allowed.test`` matches that name only; ``*.allowed.test`` matches every name below it
at any depth (``a.allowed.test``, ``a.b.allowed.test``) but not ``allowed.test`` itself.
Protocols: ``http`` (absolute-form requests; transparent connections that start with an HTTP/1
request head), ``tls`` (tunnels and transparent connections whose client sent a TLS
ClientHello), ``tcp`` (any other).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from egressgw.identity.workload import Workload

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Action = Literal["allow", "deny", "pass"]
# ``dns``: a name asked of the DNS proxy; no rule's ``protocols`` lists it (the policy files
# cannot), so a rule that selects protocols never applies to a DNS question.
Protocol = Literal["tcp", "tls", "http", "dns"]


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a flow goes, as policy sees it: one candidate IP of the destination at a time."""

    name: str | None
    ip: IPAddress | None
    port: int
    protocol: Protocol
    feeds: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of policy for one flow, explaining itself."""

    action: Literal["allow", "deny"]
    tier: str | None
    rule: str
    reason: str
    audits: tuple[str, ...] = ()
    steps: tuple[str, ...] = ()
    # The Kubernetes object the deciding rule came from (``EgressPolicy payments/psp``), if any.
    origin: str | None = None

    @property
    def rule_ref(self) -> str:
        """``tier/rule``, or ``default`` for the policy default."""
        return f"{self.tier}/{self.rule}" if self.tier else self.rule

    @property
    def rule_source(self) -> str:
        """``rule_ref`` with the object it came from, when it came from one."""
        return self.rule_ref if self.origin is None else f"{self.rule_ref} ({self.origin})"


@dataclass(frozen=True, slots=True)
class Expression:
    """A Kubernetes label selector requirement (matchExpressions)."""

    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Apply the requirement as Kubernetes does."""
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        present = labels.get(self.key)
        if self.operator == "In":
            return present is not None and present in self.values
        return present is None or present not in self.values


@dataclass(frozen=True, slots=True)
class SourceSelector:
    """``from``: which workloads a rule applies to. Empty selects every source."""

    namespaces: frozenset[str] | None = None
    labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[Expression, ...] = ()
    serviceaccounts: frozenset[str] | None = None
    unknown: bool | None = None

    def matches(self, w: Workload) -> bool:
        """True when the workload is selected."""
        if self.unknown is not None and self.unknown == w.known:
            return False
        if self.namespaces is not None and w.namespace not in self.namespaces:
            return False
        if self.serviceaccounts is not None and w.serviceaccount not in self.serviceaccounts:
            return False
        labels = w.label_map
        for key, value in self.labels:
            if labels.get(key) != value:
                return False
        return all(e.matches(labels) for e in self.expressions)


@dataclass(frozen=True, slots=True)
class DestinationSelector:
    """``to``: which destinations a rule applies to. Empty selects every destination."""

    exact: frozenset[str] = frozenset()
    suffixes: frozenset[str] = frozenset()  # "allowed.test" for "*.allowed.test"
    cidrs: tuple[IPNetwork, ...] = ()
    ports: frozenset[int] | None = None
    port_ranges: tuple[tuple[int, int], ...] = ()
    protocols: frozenset[str] | None = None
    feeds: frozenset[str] | None = None  # "*" for any feed

    @property
    def has_address(self) -> bool:
        """True when the rule names domains or CIDRs."""
        return bool(self.exact or self.suffixes or self.cidrs)

    def matches_name(self, name: str | None) -> bool:
        """Exact names, or any name strictly below a ``*.`` domain."""
        if name is None:
            return False
        if name in self.exact:
            return True
        if self.suffixes:
            dot = name.find(".")
            while dot >= 0:
                if name[dot + 1 :] in self.suffixes:
                    return True
                dot = name.find(".", dot + 1)
        return False

    def matches_ip(self, ip: IPAddress | None) -> bool:
        """True when the candidate IP lies in one of the CIDRs."""
        return ip is not None and any(ip.version == n.version and ip in n for n in self.cidrs)

    def matches_port(self, port: int) -> bool:
        """True when the port is listed or in a listed range (no ports: any port)."""
        if self.ports is None and not self.port_ranges:
            return True
        if self.ports is not None and port in self.ports:
            return True
        return any(lo <= port <= hi for lo, hi in self.port_ranges)

    def matches(self, d: Destination) -> bool:
        """True when every given key selects the destination."""
        if self.has_address and not (self.matches_name(d.name) or self.matches_ip(d.ip)):
            return False
        if not self.matches_port(d.port):
            return False
        if self.protocols is not None and d.protocol not in self.protocols:
            return False
        if self.feeds is not None:
            if not d.feeds:
                return False
            if "*" not in self.feeds and not (self.feeds & d.feeds):
                return False
        return True


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule of a tier."""

    name: str
    action: Action
    source: SourceSelector = field(default_factory=SourceSelector)
    destination: DestinationSelector = field(default_factory=DestinationSelector)
    audit: bool = False
    # Where the rule was written when not in a policy file: ``EgressPolicy payments/psp``.
    origin: str | None = None


@dataclass(frozen=True, slots=True)
class Tier:
    """An ordered list of rules with what happens when none decides."""

    name: str
    rules: tuple[Rule, ...]
    default: Action = "pass"


@dataclass(frozen=True, slots=True)
class Policy:
    """The compiled policy: tiers in order and the final default."""

    tiers: tuple[Tier, ...]
    default: Literal["allow", "deny"] = "deny"
    # True when some rule selects by protocol: only then can a tunnel's protocol change its
    # decision (the proxy skips deciding again after the peek otherwise).
    protocol_sensitive: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        sensitive = any(r.destination.protocols is not None for t in self.tiers for r in t.rules)
        object.__setattr__(self, "protocol_sensitive", sensitive)

    def decide(self, w: Workload, d: Destination, trace: bool = False) -> Decision:
        """Decide a flow; with ``trace`` the decision lists every step that led to it."""
        steps: list[str] | None = [] if trace else None
        audits: list[str] = []
        for tier in self.tiers:
            outcome = self._decide_tier(tier, w, d, audits, steps)
            if outcome is not None:
                action, rule_name, origin = outcome
                reason = f"{action} by {tier.name}/{rule_name}"
                return Decision(
                    action, tier.name, rule_name, reason, tuple(audits), tuple(steps or ()), origin
                )
        if steps is not None:
            steps.append(f"no tier decided: policy default {self.default}")
        return Decision(
            self.default,
            None,
            "default",
            f"{self.default} by policy default",
            tuple(audits),
            tuple(steps or ()),
        )

    @staticmethod
    def _decide_tier(
        tier: Tier, w: Workload, d: Destination, audits: list[str], steps: list[str] | None
    ) -> tuple[Literal["allow", "deny"], str, str | None] | None:
        for rule in tier.rules:
            ref = f"{tier.name}/{rule.name}"
            # The steps (explain) say which object a rule came from; audits name the rule only.
            shown = ref if steps is None or rule.origin is None else f"{ref} ({rule.origin})"
            if not rule.source.matches(w):
                if steps is not None:
                    steps.append(f"{shown}: source not selected")
                continue
            if not rule.destination.matches(d):
                if steps is not None:
                    steps.append(f"{shown}: destination not selected")
                continue
            if rule.audit:
                audits.append(f"would {rule.action} by {ref}")
                if steps is not None:
                    steps.append(f"{shown}: matches, audit only: would {rule.action}")
                continue
            if rule.action == "pass":
                if steps is not None:
                    steps.append(f"{shown}: matches: pass to the next tier")
                return None
            if steps is not None:
                steps.append(f"{shown}: matches: {rule.action}")
            return rule.action, rule.name, rule.origin
        if tier.default == "pass":
            if steps is not None:
                steps.append(f"{tier.name}: no rule decided, tier default pass")
            return None
        if steps is not None:
            steps.append(f"{tier.name}: no rule decided, tier default {tier.default}")
        return tier.default, "default", None


ALLOW_ALL = Policy(tiers=(), default="allow")


def parse_ports(values: Iterable[int | str]) -> tuple[frozenset[int], tuple[tuple[int, int], ...]]:
    """Split a ports list (``443``, ``"8000-8999"``) into single ports and ranges."""
    singles: set[int] = set()
    ranges: list[tuple[int, int]] = []
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool):
            lo = hi = v
        elif isinstance(v, str):
            lo_text, sep, hi_text = v.partition("-")
            if not lo_text.strip().isdigit() or (sep and not hi_text.strip().isdigit()):
                raise ValueError(f"bad port or range {v!r}: use 443 or '8000-8999'")
            lo = int(lo_text)
            hi = int(hi_text) if sep else lo
        else:
            raise ValueError(f"bad port {v!r}")
        if not (0 < lo <= hi < 65536):
            raise ValueError(f"port {v!r} out of 1-65535 or reversed")
        if lo == hi:
            singles.add(lo)
        else:
            ranges.append((lo, hi))
    return frozenset(singles), tuple(ranges)


def split_domains(patterns: Sequence[str]) -> tuple[frozenset[str], frozenset[str]]:
    """Split canonical domain patterns into exact names and ``*.`` suffixes."""
    exact = {p for p in patterns if not p.startswith("*.")}
    suffixes = {p[2:] for p in patterns if p.startswith("*.")}
    return frozenset(exact), frozenset(suffixes)
