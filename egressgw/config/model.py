"""Configuration: YAML files -> one validated, frozen model.

Rules:

1. ``load_config(path)`` reads the gateway configuration and every policy file it names; relative
   paths are relative to the configuration file.
2. Every error is collected, not only the first, and each names file, line and key path;
   ``ConfigError.errors`` lists them (``egressgw check`` prints them all). A sink's TLS files
   must exist and load (a CA certificate, a certificate with its unencrypted key).
3. The result is immutable. A reload builds a new one and swaps it in whole, or keeps the old one.
4. Without a file, ``default_config()`` is the embedded default: proxy on 127.0.0.1:3128, admin on
   127.0.0.1:9090, events to stdout, the guard on, everything else allowed.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

import feeds.spec as feeds_spec
from egressgw import resolver
from egressgw.config.source import ConfigError, YamlDocument
from egressgw.decision import policy
from egressgw.decision.names import normalise_name, parse_ip_port
from egressgw.identity.static import StaticInventory
from egressgw.identity.workload import Workload
from feeds.fetch import FetchError, resolve_local
from siem.config import (
    SinkSpec,
    SpoolSpec,
    StdoutSinkSpec,
    parse_size,
    resolve_paths,
)
from siem.secrets import secret_file_problems
from siem.tlsfiles import tls_file_problems

DEFAULT_PROXY_LISTEN = "127.0.0.1:3128"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9090"
# The egress map's bounds (record.egressmap): minute buckets, so windows are whole minutes.
DEFAULT_MAP_WINDOWS = (300.0, 3600.0)
DEFAULT_MAP_MAX_EDGES = 5_000
DEFAULT_MAP_RECENT_FLOWS = 500
DEFAULT_MAX_CONNECTIONS = 10_000
# A tenth of max_connections: one source (a pod, or a node's pods behind SNAT) cannot take the
# gateway from the rest, while far above what ordinary clients keep open (browsers 6 per host,
# HTTP client pools tens to a few hundred).
DEFAULT_MAX_CONNECTIONS_PER_SOURCE = 1_000
DEFAULT_MAX_HEADER_BYTES = 32 * 1024
DEFAULT_MAX_HEADERS = 100
DEFAULT_MAX_PIPELINED_REQUESTS = 16
DEFAULT_MAX_PENDING_BYTES = 256 * 1024
DEFAULT_CONNECT_TIMEOUT = 10.0
# Seconds a transparent connection's first bytes are waited for before it is decided by address
# (server-first protocols such as SMTP and SSH send nothing until the server spoke).
DEFAULT_PEEK_TIMEOUT = 1.0
DEFAULT_HEAD_TIMEOUT = 30.0
# nginx's proxy_read_timeout is 60 s; twice that leaves room for long-poll APIs that hold their
# response head, and stays well below idle_timeout.
DEFAULT_RESPONSE_TIMEOUT = 120.0
DEFAULT_IDLE_TIMEOUT = 300.0
# Idle absolute-form upstreams kept for reuse (all, per destination address, port and source),
# and how long one stays parked: many servers close idle keep-alive connections after 5-60 s,
# and a parked connection its peer closed costs a retry or a peek.
DEFAULT_MAX_IDLE_UPSTREAMS = 512
DEFAULT_MAX_IDLE_UPSTREAMS_PER_DESTINATION = 64
DEFAULT_UPSTREAM_IDLE_TIMEOUT = 30.0
DEFAULT_DRAIN_TIMEOUT = 10.0
# Kubernetes takes a few seconds to remove a terminating pod from every node's Service rules
# (endpoints -> kube-proxy or the CNI): until then clients are still sent here.
DEFAULT_SHUTDOWN_DELAY = 5.0
DEFAULT_WORKER_LIVENESS_TIMEOUT = 10.0
# Long enough for a first fetch of every feed to succeed or fail (a refused connection or an
# unknown name fails at once; a feed's own timeout is 30 s), short enough for a rollout to go on.
DEFAULT_READINESS_FEEDS_TIMEOUT = 60.0
DEFAULT_RESOLVER_TIMEOUT = 5.0
DEFAULT_RESOLVER_CACHE = 10_000
DEFAULT_MIN_TTL = 0.0
DEFAULT_MAX_TTL = 3600.0
DEFAULT_WATCH_INTERVAL = 2.0
# How long the API server holds one watch open before the gateway opens the next.
DEFAULT_KUBE_WATCH_TIMEOUT = 300
DEFAULT_DNS_TIMEOUT = 2.0
# Upstream queries in flight at once, in all and per client address: a client flooding the proxy
# gets REFUSED past its share and the others are still forwarded.
DEFAULT_DNS_MAX_INFLIGHT = 1_000
DEFAULT_DNS_MAX_INFLIGHT_PER_SOURCE = 100
DEFAULT_DNS_MAX_TCP_CONNECTIONS = 256
DEFAULT_DNS_TCP_IDLE_TIMEOUT = 10.0
DEFAULT_DNS_RECORDS = 100_000
DEFAULT_DNS_RECORDS_PER_CLIENT = 2_000
DEFAULT_NODE_TABLE = "egressgw"
DEFAULT_EXEMPT_MARK = 0x539

Duration = Annotated[float, BeforeValidator(feeds_spec.parse_duration), Field(gt=0)]
Size = Annotated[int, BeforeValidator(parse_size)]


def _duration_or_zero(value: object) -> object:
    # parse_duration refuses 0; here 0 means "not at all".
    if value in (0, "0", "0s"):
        return 0.0
    return feeds_spec.parse_duration(value) if isinstance(value, str | int | float) else value


DurationOrZero = Annotated[float, BeforeValidator(_duration_or_zero), Field(ge=0)]


def _listen(value: str) -> str:
    try:
        parse_ip_port(value)
    except ValueError as e:
        raise ValueError(f"listen address {value!r} must be IP:port ([v6]:port): {e}") from e
    return value


ListenAddress = Annotated[str, BeforeValidator(_listen)]


def _network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise ValueError(f"expected a CIDR string, got {value!r}")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise ValueError(f"bad CIDR {value!r}: {e}") from e


Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_network)]


def _workers(value: object) -> object:
    if value == "auto" or (type(value) is int and value >= 1):
        return value
    raise ValueError(f"workers must be a whole number >= 1 or auto, got {value!r}")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ProxyConfig(_Model):
    """The explicit proxy listener and its limits."""

    listen: ListenAddress = DEFAULT_PROXY_LISTEN
    max_connections: int = Field(DEFAULT_MAX_CONNECTIONS, ge=1)
    max_connections_per_source: int = Field(DEFAULT_MAX_CONNECTIONS_PER_SOURCE, ge=1)
    max_header_bytes: int = Field(DEFAULT_MAX_HEADER_BYTES, ge=1024)
    max_headers: int = Field(DEFAULT_MAX_HEADERS, ge=4)
    # Per client connection: requests read ahead of the one being relayed, and the bytes of
    # heads and bodies read but not yet sent on; past either the client is not read.
    max_pipelined_requests: int = Field(DEFAULT_MAX_PIPELINED_REQUESTS, ge=1, le=10_000)
    max_pending_bytes: Size = Field(DEFAULT_MAX_PENDING_BYTES, ge=16 * 1024, le=64 * 1024 * 1024)
    connect_timeout: Duration = DEFAULT_CONNECT_TIMEOUT
    head_timeout: Duration = DEFAULT_HEAD_TIMEOUT
    response_timeout: Duration = DEFAULT_RESPONSE_TIMEOUT
    idle_timeout: Duration = DEFAULT_IDLE_TIMEOUT
    drain_timeout: Duration = DEFAULT_DRAIN_TIMEOUT
    max_idle_upstreams: int = Field(DEFAULT_MAX_IDLE_UPSTREAMS, ge=0)
    max_idle_upstreams_per_destination: int = Field(
        DEFAULT_MAX_IDLE_UPSTREAMS_PER_DESTINATION, ge=0
    )
    upstream_idle_timeout: Duration = DEFAULT_UPSTREAM_IDLE_TIMEOUT
    # On SIGTERM: /readyz turns 503 and the listener keeps accepting this long, then drains.
    shutdown_delay: DurationOrZero = DEFAULT_SHUTDOWN_DELAY
    via: str = Field("egressgw", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    # Processes accepting on the listeners (SO_REUSEPORT) under one supervisor; ``auto``: one
    # per CPU. 1 is the single process of old.
    workers: Annotated[int | Literal["auto"], BeforeValidator(_workers)] = 1
    # A worker whose event loop has not answered the supervisor's check within this long is
    # killed and started again: it may be alive, but it serves nobody.
    worker_liveness_timeout: Duration = DEFAULT_WORKER_LIVENESS_TIMEOUT


class AdminAuthConfig(_Model):
    """A bearer token the egress map's page and API require (a mounted Secret)."""

    token_file: Path


class EgressMapConfig(_Model):
    """The egress map: windowed per-edge counts and recent refused flows, in memory."""

    enabled: bool = True
    windows: tuple[Duration, ...] = DEFAULT_MAP_WINDOWS
    max_edges: int = Field(DEFAULT_MAP_MAX_EDGES, ge=1)
    recent_flows: int = Field(DEFAULT_MAP_RECENT_FLOWS, ge=1)

    @field_validator("windows")
    @classmethod
    def _whole_minutes(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        if not values:
            raise ValueError("at least one window")
        for v in values:
            if v % 60:
                raise ValueError(f"window {v:g}s is not a whole number of minutes")
        return values


class AdminConfig(_Model):
    """The admin HTTP server (/healthz, /readyz, /metrics, the egress map at / and /api/v1)."""

    listen: ListenAddress = DEFAULT_ADMIN_LISTEN
    # /metrics on a listener of its own (and no longer on ``listen``): Prometheus reaches it
    # without reaching the egress map.
    metrics_listen: ListenAddress | None = None
    auth: AdminAuthConfig | None = None
    map: EgressMapConfig = EgressMapConfig()


class ResolverConfig(_Model):
    """DNS resolution of destination names."""

    nameservers: tuple[str, ...] = ()
    timeout: Duration = DEFAULT_RESOLVER_TIMEOUT
    cache_size: int = Field(DEFAULT_RESOLVER_CACHE, ge=0)
    min_ttl: float = Field(DEFAULT_MIN_TTL, ge=0)
    max_ttl: float = Field(DEFAULT_MAX_TTL, ge=0)
    ipv6: bool = True
    max_inflight: int = Field(resolver.DEFAULT_MAX_INFLIGHT, ge=1)
    max_inflight_per_source: int = Field(resolver.DEFAULT_MAX_INFLIGHT_PER_SOURCE, ge=1)

    @field_validator("nameservers")
    @classmethod
    def _hostports(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for v in values:
            try:
                parse_ip_port(v, 53)
            except ValueError as e:
                msg = f"nameserver {v!r} must be an IP or IP:port ([v6]:port): {e}"
                raise ValueError(msg) from e
        return values


class GuardConfig(_Model):
    """The destination guard."""

    enabled: bool = True
    allow: tuple[Network, ...] = ()


class StaticEntry(_Model):
    """One source CIDR attributed to a workload."""

    cidr: Network
    namespace: str = Field(min_length=1)
    pod: str | None = None
    serviceaccount: str | None = None
    node: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class KubernetesIdentityConfig(_Model):
    """Pods from the Kubernetes API, watched: source address -> pod."""

    # None: the in-cluster service-account configuration (token, CA, KUBERNETES_SERVICE_HOST).
    kubeconfig: Path | None = None
    namespaces: tuple[Annotated[str, Field(min_length=1)], ...] = ()  # empty: every namespace
    # Watch only the pods of this gateway's node (spec.nodeName = $NODE_NAME): one per node.
    own_node: bool = False
    watch_timeout: int = Field(DEFAULT_KUBE_WATCH_TIMEOUT, ge=10, le=3600)


class IdentityConfig(_Model):
    """Where workload identities come from: pods first when watched, then the static CIDRs."""

    static: tuple[StaticEntry, ...] = ()
    kubernetes: KubernetesIdentityConfig | None = None


class PolicyConfig(_Model):
    """Policy files, evaluated tier after tier in file order; and resources from the API."""

    files: tuple[Path, ...] = ()
    # Also GlobalEgressPolicy, EgressPolicy and ThreatFeed resources (egressgw.io/v1alpha1).
    kubernetes: bool = False


class ReloadConfig(_Model):
    """Reloading configuration and policy when their files change."""

    watch: bool = True
    interval: Duration = DEFAULT_WATCH_INTERVAL


class ReadinessConfig(_Model):
    """When ``/readyz`` turns ready."""

    # How long readiness waits for feeds with no data (none stored, none fetched yet) before it
    # turns ready without them; feeds marked ``required`` are waited for without end.
    feeds_timeout: DurationOrZero = DEFAULT_READINESS_FEEDS_TIMEOUT


class TransparentConfig(_Model):
    """The transparent listener (pod egress redirected by the node's nftables rules)."""

    listen: ListenAddress | None = None
    peek_timeout: Duration = DEFAULT_PEEK_TIMEOUT


def _upstream(value: str) -> str:
    try:
        parse_ip_port(value, 53)
    except ValueError as e:
        raise ValueError(f"upstream {value!r} must be an IP or IP:port ([v6]:port): {e}") from e
    return value


def _domain(value: str) -> str:
    return normalise_name(value)


class DnsConfig(_Model):
    """The DNS proxy: queries judged by policy and feeds, forwarded to ``upstreams``."""

    listen: ListenAddress | None = None
    upstreams: tuple[Annotated[str, BeforeValidator(_upstream)], ...] = ()
    blocked_answer: Literal["nxdomain", "sinkhole"] = "nxdomain"
    sinkhole: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address("0.0.0.0")
    # Names under these are answered without the guard: cluster services have private addresses.
    internal_domains: tuple[Annotated[str, BeforeValidator(_domain)], ...] = ("cluster.local",)
    timeout: Duration = DEFAULT_DNS_TIMEOUT
    max_inflight: int = Field(DEFAULT_DNS_MAX_INFLIGHT, ge=1)
    max_inflight_per_source: int = Field(DEFAULT_DNS_MAX_INFLIGHT_PER_SOURCE, ge=1)
    max_tcp_connections: int = Field(DEFAULT_DNS_MAX_TCP_CONNECTIONS, ge=1)
    tcp_idle_timeout: Duration = DEFAULT_DNS_TCP_IDLE_TIMEOUT
    max_records: int = Field(DEFAULT_DNS_RECORDS, ge=1)
    max_records_per_client: int = Field(DEFAULT_DNS_RECORDS_PER_CLIENT, ge=1)

    @model_validator(mode="after")
    def _needs_upstreams(self) -> DnsConfig:
        if self.listen is not None and not self.upstreams:
            raise ValueError("dns.listen needs dns.upstreams (the servers queries go to)")
        return self


class NodeConfig(_Model):
    """Per-node redirection rules (``egressgw node setup``)."""

    pod_cidrs: tuple[Network, ...] = ()
    interfaces: tuple[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,15}$")], ...] = ()
    exempt_mark: int = Field(DEFAULT_EXEMPT_MARK, ge=1, le=0xFFFFFFFF)
    # Destinations pod TCP reaches directly (service CIDRs, the node network); pod CIDRs always.
    exclude_cidrs: tuple[Network, ...] = ()
    # Keep the table's blocked_v4/blocked_v6 sets filled with the feeds' IPs while running.
    firewall: bool = True
    table: str = Field(DEFAULT_NODE_TABLE, pattern=r"^[A-Za-z][A-Za-z0-9_]{0,30}$")

    @property
    def enabled(self) -> bool:
        """True when this gateway runs per node (pod sources or interfaces are named)."""
        return bool(self.pod_cidrs or self.interfaces)


class LogConfig(_Model):
    """The gateway's own log."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Config(_Model):
    """The whole gateway configuration."""

    proxy: ProxyConfig = ProxyConfig()
    admin: AdminConfig = AdminConfig()
    resolver: ResolverConfig = ResolverConfig()
    guard: GuardConfig = GuardConfig()
    identity: IdentityConfig = IdentityConfig()
    feeds: tuple[feeds_spec.FeedSpec, ...] = ()
    policy: PolicyConfig = PolicyConfig()
    spool: SpoolSpec | None = None
    sinks: tuple[SinkSpec, ...] = (StdoutSinkSpec(type="stdout"),)
    log: LogConfig = LogConfig()
    reload: ReloadConfig = ReloadConfig()
    readiness: ReadinessConfig = ReadinessConfig()
    state_dir: Path = Path("state")
    # A read-only copy of a state_dir made elsewhere (a ConfigMap or volume): feed data stored
    # there is served where state_dir holds none for the feed.
    state_seed_dir: Path | None = None
    transparent: TransparentConfig = TransparentConfig()
    dns: DnsConfig = DnsConfig()
    node: NodeConfig = NodeConfig()
    # namespace -> the source address its outbound connections leave from
    egress_ips: dict[
        Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")],
        ipaddress.IPv4Address | ipaddress.IPv6Address,
    ] = Field(default_factory=dict)


# ---- policy files ----------------------------------------------------------------------------


def _domain_pattern(value: str) -> str:
    wildcard = value.startswith("*.")
    name = normalise_name(value[2:] if wildcard else value)
    return f"*.{name}" if wildcard else name


class SourceSpec(_Model):
    """``from`` of a rule."""

    namespace: str | list[str] | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    matchLabels: dict[str, str] = Field(default_factory=dict)
    matchExpressions: list[ExpressionSpec] = Field(default_factory=list)
    serviceaccount: str | list[str] | None = None
    unknown: bool | None = None


class ExpressionSpec(_Model):
    """A Kubernetes label selector requirement."""

    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)


class DestinationSpec(_Model):
    """``to`` of a rule."""

    domains: list[Annotated[str, BeforeValidator(_domain_pattern)]] = Field(default_factory=list)
    cidrs: list[Network] = Field(default_factory=list)
    ports: list[int | str] = Field(default_factory=list)
    protocols: list[Literal["tcp", "tls", "http"]] = Field(default_factory=list)
    feeds: list[str] = Field(default_factory=list)

    @field_validator("ports")
    @classmethod
    def _ports(cls, values: list[int | str]) -> list[int | str]:
        policy.parse_ports(values)
        return values


class RuleSpec(_Model):
    """One rule."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")
    action: Literal["allow", "deny", "pass"]
    audit: bool = False
    from_: SourceSpec = Field(default_factory=SourceSpec, alias="from")
    to: DestinationSpec = Field(default_factory=DestinationSpec)


class TierSpec(_Model):
    """One tier."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")
    default: Literal["allow", "deny", "pass"] = "pass"
    rules: list[RuleSpec] = Field(default_factory=list)


class PolicyFile(_Model):
    """A policy file: tiers and, in at most one file, the final default."""

    default: Literal["allow", "deny"] | None = None
    tiers: list[TierSpec] = Field(default_factory=list)


SourceSpec.model_rebuild()


def _as_set(value: str | list[str] | None) -> frozenset[str] | None:
    if value is None:
        return None
    return frozenset([value] if isinstance(value, str) else value)


def compile_rule(spec: RuleSpec) -> policy.Rule:
    """The runtime rule of a validated rule spec."""
    src = spec.from_
    labels = {**src.labels, **src.matchLabels}
    dst = spec.to
    exact, suffixes = policy.split_domains(dst.domains)
    singles, ranges = policy.parse_ports(dst.ports)
    return policy.Rule(
        name=spec.name,
        action=spec.action,
        audit=spec.audit,
        source=policy.SourceSelector(
            namespaces=_as_set(src.namespace),
            labels=tuple(sorted(labels.items())),
            expressions=tuple(
                policy.Expression(e.key, e.operator, frozenset(e.values))
                for e in src.matchExpressions
            ),
            serviceaccounts=_as_set(src.serviceaccount),
            unknown=src.unknown,
        ),
        destination=policy.DestinationSelector(
            exact=exact,
            suffixes=suffixes,
            cidrs=tuple(dst.cidrs),
            ports=singles if (dst.ports and singles) else None,
            port_ranges=ranges,
            protocols=frozenset(dst.protocols) if dst.protocols else None,
            feeds=frozenset(dst.feeds) if dst.feeds else None,
        ),
    )


def _no_feed(name: str) -> str:
    return f"no feed named {name!r} is configured"


def _unknown_feeds(doc: YamlDocument, feed_names: set[str]) -> list[str]:
    """Feed names no configured feed has, read from the raw file (used when the schema fails)."""
    out = []
    tiers = doc.data.get("tiers") if isinstance(doc.data, dict) else None
    for ti, tier in enumerate(tiers if isinstance(tiers, list) else []):
        rules = tier.get("rules") if isinstance(tier, dict) else None
        for ri, rule in enumerate(rules if isinstance(rules, list) else []):
            to = rule.get("to") if isinstance(rule, dict) else None
            feeds = to.get("feeds") if isinstance(to, dict) else None
            for fi, feed in enumerate(feeds if isinstance(feeds, list) else []):
                if isinstance(feed, str) and feed != "*" and feed not in feed_names:
                    loc: list[str | int] = ["tiers", ti, "rules", ri, "to", "feeds", fi]
                    key = f"tiers[{ti}].rules[{ri}].to.feeds[{fi}]"
                    out.append(f"{doc.path}:{doc.line_of(loc)}: {key}: {_no_feed(feed)}")
    return out


def _by_line(doc: YamlDocument, errors: list[str]) -> list[str]:
    """One file's errors in the order of their lines (each starts ``file:line:``)."""
    prefix = f"{doc.path}:"

    def line(error: str) -> int:
        number = error.removeprefix(prefix).partition(":")[0]
        return int(number) if number.isdigit() else 0

    return sorted(errors, key=line)


def _duplicate_names(doc: YamlDocument, seen_tiers: dict[str, str]) -> list[str]:
    """Tiers named twice (in any file) and rules named twice in a tier, from the raw file.

    ``seen_tiers`` maps each tier name met so far to ``file:line`` and is updated.
    """
    out = []
    tiers = doc.data.get("tiers") if isinstance(doc.data, dict) else None
    for ti, tier in enumerate(tiers if isinstance(tiers, list) else []):
        name = tier.get("name") if isinstance(tier, dict) else None
        if not isinstance(name, str):
            continue
        where = f"{doc.path}:{doc.line_of(['tiers', ti, 'name'])}"
        if name in seen_tiers:
            out.append(f"{where}: tiers[{ti}].name: tier {name!r} also in {seen_tiers[name]}")
        else:
            seen_tiers[name] = where
        rules = tier.get("rules")
        names: set[str] = set()
        for ri, rule in enumerate(rules if isinstance(rules, list) else []):
            rule_name = rule.get("name") if isinstance(rule, dict) else None
            if not isinstance(rule_name, str):
                continue
            if rule_name in names:
                line = doc.line_of(["tiers", ti, "rules", ri, "name"])
                out.append(
                    f"{doc.path}:{line}: tiers[{ti}].rules[{ri}].name: "
                    f"duplicate rule {rule_name!r} in tier {name!r}"
                )
            names.add(rule_name)
    return out


def check_expressions(spec: RuleSpec) -> list[tuple[list[str | int], str]]:
    """Label selector requirements the schema lets through but Kubernetes refuses: (key, why)."""
    problems: list[tuple[list[str | int], str]] = []
    for i, e in enumerate(spec.from_.matchExpressions):
        if e.operator in ("In", "NotIn") and not e.values:
            problems.append(
                (["from", "matchExpressions", i, "values"], f"{e.operator} needs values")
            )
        if e.operator in ("Exists", "DoesNotExist") and e.values:
            problems.append((["from", "matchExpressions", i, "values"], f"{e.operator} takes none"))
    return problems


def load_policy(paths: tuple[Path, ...], feed_names: set[str]) -> policy.Policy:
    """Load and compile policy files, collecting every error with file, line and key path."""
    if not paths:
        return policy.ALLOW_ALL
    errors: list[str] = []
    tiers: list[policy.Tier] = []
    default: Literal["allow", "deny"] | None = None
    seen_tiers: dict[str, str] = {}
    for path in paths:
        try:
            doc = YamlDocument(path)
        except ConfigError as e:
            errors.extend(e.errors)
            continue
        found: list[str] = []
        # Names and the default are checked on the file as written: schema errors hide none.
        found.extend(_duplicate_names(doc, seen_tiers))
        raw_default = doc.data.get("default") if isinstance(doc.data, dict) else None
        if raw_default is not None:
            if default is not None:
                found.append(f"{path}:{doc.line_of(['default'])}: default: set in two files")
            if raw_default in ("allow", "deny"):
                default = raw_default
        try:
            spec = PolicyFile.model_validate(doc.data)
        except ValidationError as e:
            found.extend(doc.errors_from(e))
            # Schema errors stop the compile, not the other checks: report those too.
            found.extend(_unknown_feeds(doc, feed_names))
            errors.extend(_by_line(doc, found))
            continue

        def err(
            loc: list[str | int], msg: str, doc: YamlDocument = doc, found: list[str] = found
        ) -> None:
            key = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in loc).lstrip(".")
            found.append(f"{doc.path}:{doc.line_of(loc)}: {key}: {msg}")

        for ti, tier in enumerate(spec.tiers):
            for ri, rule in enumerate(tier.rules):
                key: list[str | int] = ["tiers", ti, "rules", ri]
                for fi, feed in enumerate(rule.to.feeds):
                    if feed != "*" and feed not in feed_names:
                        err([*key, "to", "feeds", fi], _no_feed(feed))
                for sub, msg in check_expressions(rule):
                    err([*key, *sub], msg)
            tiers.append(
                policy.Tier(tier.name, tuple(compile_rule(r) for r in tier.rules), tier.default)
            )
        errors.extend(_by_line(doc, found))
    if errors:
        raise ConfigError(errors)
    return policy.Policy(tuple(tiers), default or "deny")


def _resolve_relative(cfg: Config, base: Path) -> Config:
    files = tuple(p if p.is_absolute() else base / p for p in cfg.policy.files)
    identity = cfg.identity
    kube = identity.kubernetes
    if kube is not None and kube.kubeconfig is not None and not kube.kubeconfig.is_absolute():
        kube = kube.model_copy(update={"kubeconfig": base / kube.kubeconfig})
        identity = identity.model_copy(update={"kubernetes": kube})
    return cfg.model_copy(
        update={
            "identity": identity,
            "policy": cfg.policy.model_copy(update={"files": files}),
            "state_dir": cfg.state_dir if cfg.state_dir.is_absolute() else base / cfg.state_dir,
            "state_seed_dir": (
                base / cfg.state_seed_dir
                if cfg.state_seed_dir is not None and not cfg.state_seed_dir.is_absolute()
                else cfg.state_seed_dir
            ),
            "spool": resolve_paths(cfg.spool, base) if cfg.spool else None,
            "sinks": tuple(resolve_paths(s, base) for s in cfg.sinks),
        }
    )


def load_config(path: Path) -> Config:
    """Load and validate a configuration file (policy files are loaded by ``load_policy``)."""
    cfg, errors = read_config(path)
    if errors or cfg is None:
        raise ConfigError(errors)
    return cfg


def read_config(path: Path) -> tuple[Config | None, list[str]]:
    """The configuration and every error found in it; the model is None when the schema failed.

    A model comes back beside errors that do not stop the others from being found (a missing
    TLS file, two feeds with one name), so ``check`` can go on to the policy files.
    """
    doc = YamlDocument(path)
    try:
        cfg = Config.model_validate(doc.data, context={"base_dir": path.parent})
    except ValidationError as e:
        return None, doc.errors_from(e)
    errors = []
    try:
        feeds_spec.check_unique_names(cfg.feeds)
    except ValueError as e:
        errors.append(f"{path}:{doc.line_of(['feeds'])}: feeds: {e}")
    cfg = _resolve_relative(cfg, path.parent)
    kube = cfg.identity.kubernetes
    if kube is not None and kube.kubeconfig is not None and not kube.kubeconfig.is_file():
        line = doc.line_of(["identity", "kubernetes", "kubeconfig"])
        message = f"kubeconfig not found: {kube.kubeconfig}"
        errors.append(f"{path}:{line}: identity.kubernetes.kubeconfig: {message}")
    if cfg.policy.kubernetes and kube is None:
        line = doc.line_of(["policy", "kubernetes"])
        message = "needs identity.kubernetes (where the API is, and whose pods policy selects)"
        errors.append(f"{path}:{line}: policy.kubernetes: {message}")
    for i, sink in enumerate(cfg.sinks):
        for key, problem in [*tls_file_problems(sink), *secret_file_problems(sink)]:
            errors.append(f"{path}:{doc.line_of(['sinks', i, key])}: sinks[{i}].{key}: {problem}")
    if cfg.dns.listen is not None and worker_count(cfg) > 1:
        line = doc.line_of(["proxy", "workers"])
        errors.append(
            f"{path}:{line}: proxy.workers: more than one worker with dns.listen set: the DNS "
            "proxy's answers, which the transparent listener checks claimed names against, "
            "live in one process (run one worker, or no DNS proxy)"
        )
    if cfg.admin.auth is not None:
        token_problem = _token_file_problem(path.parent / cfg.admin.auth.token_file)
        if token_problem is not None:
            line = doc.line_of(["admin", "auth", "token_file"])
            errors.append(f"{path}:{line}: admin.auth.token_file: {token_problem}")
    return cfg, errors


def worker_count(cfg: Config) -> int:
    """How many worker processes ``proxy.workers`` asks for (``auto``: the CPU count)."""
    workers = cfg.proxy.workers
    return (os.cpu_count() or 1) if workers == "auto" else workers


def _token_file_problem(path: Path) -> str | None:
    """Why the admin token file cannot serve, or None (the gateway reads it when it starts)."""
    try:
        token = path.read_text().strip()
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    return None if token else f"{path} is empty"


def feed_file_errors(path: Path, cfg: Config) -> list[str]:
    """Local feed files of enabled feeds that do not exist (for ``check``).

    Not a reason to refuse a configuration: the gateway runs, keeps retrying and is not ready
    until the file appears, and a reload (which changes no feed) must not fail over it.
    """
    doc = YamlDocument(path)
    out = []
    for i, spec in enumerate(cfg.feeds):
        if not spec.enabled or spec.is_remote:
            continue
        try:
            file = resolve_local(spec.url, path.parent)
        except FetchError as e:
            out.append(f"{path}:{doc.line_of(['feeds', i, 'url'])}: feeds[{i}].url: {e.reason}")
            continue
        if not file.is_file():
            line = doc.line_of(["feeds", i, "url"])
            out.append(f"{path}:{line}: feeds[{i}].url: feed file not found: {file}")
    return out


def unbuilt(cfg: Config) -> list[str]:
    """Keys set in ``cfg`` whose feature this version does not have yet, each saying so."""
    out: list[str] = []
    return out


def default_config() -> Config:
    """The embedded default configuration."""
    return Config()


def build_inventory(cfg: Config) -> StaticInventory:
    """The static identity inventory of a configuration."""
    return StaticInventory(
        (
            e.cidr,
            Workload.make(
                e.namespace, e.pod, e.labels, e.serviceaccount, e.node, attribution="static"
            ),
        )
        for e in cfg.identity.static
    )
