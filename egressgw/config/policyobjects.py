"""Policy and feeds as Kubernetes resources: objects -> rules per tier, feeds, a verdict each. Pure.

Rules (kinds of group ``egressgw.io``, version ``v1alpha1``; ``docs/policy.md``):

1. A ``ThreatFeed`` (cluster-scoped) is a feed definition named by ``metadata.name``, as an entry
   of ``feeds:``. Its source must be ``http://`` or ``https://``: an object anyone with RBAC on it
   writes must not make the gateway read its own files. A name a configured feed has is refused.
2. A ``GlobalEgressPolicy`` (cluster-scoped) puts its rules in the tier it names; an
   ``EgressPolicy`` (namespaced) in the tier it names, the last tier of the policy files when it
   names none. The tier must be one of the policy files': objects add rules, never tiers.
3. Within a tier the files' rules come first, then each object's rules, objects by ``order``
   (lower first, 0 when unset), then name, then namespace.
4. An ``EgressPolicy`` selects only workloads of its own namespace, whatever its ``from`` says
   (``from.namespace`` naming others selects nothing): it can neither allow nor deny, audit or
   pass anything for a workload of another namespace, or for an unknown source.
5. An object is judged whole: a schema error, an unknown tier, a feed no configured feed or
   accepted ThreatFeed has, a bad label selector or a rule name given twice refuses it, and a
   refused object adds nothing. If an earlier generation of it was accepted (``last_good``) and
   still fits the tiers and feeds, that one stays in force: a broken edit changes nothing.
6. Every object gets a ``Verdict``; ``status_patch`` turns it into the merge patch of its
   ``status`` (condition ``Accepted``), or None when the object already shows it, so several
   gateways judging alike write once between them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from egressgw.config.model import RuleSpec, check_expressions, compile_rule
from egressgw.decision import policy
from feeds.spec import FeedSpec

GROUP = "egressgw.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
GLOBAL_POLICY = "GlobalEgressPolicy"
POLICY = "EgressPolicy"
THREAT_FEED = "ThreatFeed"
KINDS = (GLOBAL_POLICY, POLICY, THREAT_FEED)
CONDITION = "Accepted"

# (kind, namespace or "", name)
Key = tuple[str, str, str]


def key_of(obj: Mapping[str, Any]) -> Key:
    """The (kind, namespace, name) of an object."""
    meta = obj.get("metadata") or {}
    return (str(obj.get("kind", "")), str(meta.get("namespace") or ""), str(meta.get("name", "")))


def describe(key: Key) -> str:
    """``EgressPolicy payments/psp`` or ``GlobalEgressPolicy block-mining``."""
    kind, namespace, name = key
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the gateway made of one generation of an object."""

    accepted: bool
    reason: str  # CamelCase, as Kubernetes condition reasons are
    message: str
    generation: int


@dataclass(frozen=True, slots=True)
class Compiled:
    """One accepted generation of an object: its rules (or feed) and what it depends on."""

    key: Key
    generation: int
    tier: str | None = None
    order: int = 0
    rules: tuple[policy.Rule, ...] = ()
    feeds_used: frozenset[str] = frozenset()
    feed: FeedSpec | None = None


@dataclass(frozen=True, slots=True)
class Judged:
    """The outcome of judging every object."""

    policy: policy.Policy  # the files' policy with the objects' rules in their tiers
    feeds: tuple[FeedSpec, ...]  # the ThreatFeeds in force, by name
    verdicts: dict[Key, Verdict]
    in_force: dict[Key, Compiled]  # accepted now, or kept from last_good: pass back next time


class _PolicySpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tier: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,128}$")
    order: int = Field(0, ge=-(2**31), le=2**31 - 1)
    rules: list[RuleSpec]


class Refused(ValueError):
    """An object is refused: ``reason`` (CamelCase) and a message naming the key."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def _key_path(loc: Iterable[str | int]) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in loc).lstrip(".")


def _schema_error(e: ValidationError, prefix: str) -> Refused:
    first = e.errors()[0]
    loc = [k for k in first["loc"] if isinstance(k, str | int)]
    # Pydantic names the union member or validator it tried; the path to the key is enough.
    loc = [k for k in loc if not (isinstance(k, str) and ("[" in k or k.startswith("function")))]
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    message = first["msg"].removeprefix("Value error, ")
    return Refused("InvalidSpec", f"{_key_path([prefix, *loc])}: {message}{more}")


def compile_feed(obj: Mapping[str, Any], config_feeds: Collection[str]) -> Compiled:
    """A ThreatFeed's feed definition; Refused if it cannot be one."""
    key = key_of(obj)
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise Refused("InvalidSpec", "spec: required, an object")
    if key[2] in config_feeds:
        raise Refused("DuplicateName", f"metadata.name: a configured feed is named {key[2]!r}")
    if "name" in spec and spec["name"] != key[2]:
        raise Refused("InvalidSpec", "spec.name: the feed is named by metadata.name")
    try:
        feed = FeedSpec.model_validate({**spec, "name": key[2]})
    except ValidationError as e:
        raise _schema_error(e, "spec") from None
    if not feed.is_remote:
        message = f"spec.url: {feed.url!r} is not http:// or https:// (no local files)"
        raise Refused("LocalSource", message)
    return Compiled(key, _generation(obj), feed=feed)


def compile_policy(
    obj: Mapping[str, Any], tiers: Collection[str], feed_names: Collection[str]
) -> Compiled:
    """A (Global)EgressPolicy's rules, scoped and marked with their origin; Refused if bad."""
    key = key_of(obj)
    kind, namespace, _ = key
    try:
        spec = _PolicySpec.model_validate(obj.get("spec"))
    except ValidationError as e:
        raise _schema_error(e, "spec") from None
    tier = spec.tier
    if tier is None:
        if kind == GLOBAL_POLICY:
            raise Refused("InvalidSpec", "spec.tier: required in a GlobalEgressPolicy")
        if not tiers:
            raise Refused("UnknownTier", "spec.tier: the policy files define no tier to join")
        tier = list(tiers)[-1]
    elif tier not in tiers:
        known = ", ".join(tiers) or "none"
        message = f"spec.tier: no tier named {tier!r} in the policy files (tiers: {known})"
        raise Refused("UnknownTier", message)
    seen: set[str] = set()
    used: set[str] = set()
    for i, rule_spec in enumerate(spec.rules):
        where = f"spec.rules[{i}]"
        if rule_spec.name in seen:
            raise Refused("InvalidSpec", f"{where}.name: rule {rule_spec.name!r} given twice")
        seen.add(rule_spec.name)
        for sub, problem in check_expressions(rule_spec):
            raise Refused("InvalidSelector", f"{_key_path([where, *sub])}: {problem}")
        for fi, feed in enumerate(rule_spec.to.feeds):
            if feed != "*" and feed not in feed_names:
                message = f"{where}.to.feeds[{fi}]: no feed named {feed!r} is configured"
                raise Refused("UnknownFeed", message)
            used.add(feed)
    origin = describe(key)
    rules: list[policy.Rule] = []
    for rule_spec in spec.rules:
        rule = replace(compile_rule(rule_spec), origin=origin)
        if kind == POLICY:
            rule = replace(rule, source=_scoped(rule.source, namespace))
        rules.append(rule)
    return Compiled(key, _generation(obj), tier, spec.order, tuple(rules), frozenset(used - {"*"}))


def _scoped(source: policy.SourceSelector, namespace: str) -> policy.SourceSelector:
    """The selector restricted to one namespace (rule 4)."""
    mine = frozenset({namespace})
    return replace(
        source, namespaces=mine if source.namespaces is None else source.namespaces & mine
    )


def _generation(obj: Mapping[str, Any]) -> int:
    value = (obj.get("metadata") or {}).get("generation")
    return value if isinstance(value, int) else 0


def _still_fits(c: Compiled, tiers: Collection[str], feed_names: Collection[str]) -> bool:
    """True when a kept generation still has its tier and feeds (a reload may remove them)."""
    if c.feed is not None:
        return c.key[2] not in feed_names
    return c.tier in tiers and c.feeds_used <= set(feed_names)


def judge(
    objects: Iterable[Mapping[str, Any]],
    files: policy.Policy,
    config_feeds: Collection[str],
    last_good: Mapping[Key, Compiled] | None = None,
) -> Judged:
    """Judge every object against the files' policy and the configured feeds (module rules)."""
    last_good = last_good or {}
    by_kind: dict[str, list[Mapping[str, Any]]] = {k: [] for k in KINDS}
    for obj in objects:
        if obj.get("kind") in by_kind:
            by_kind[str(obj["kind"])].append(obj)
    verdicts: dict[Key, Verdict] = {}
    in_force: dict[Key, Compiled] = {}

    def refused(obj: Mapping[str, Any], e: Refused, kept: Compiled | None) -> None:
        message = str(e)
        if kept is not None:
            message += f"; generation {kept.generation} stays in force"
            in_force[kept.key] = kept
        verdicts[key_of(obj)] = Verdict(False, e.reason, message, _generation(obj))

    config = set(config_feeds)
    for obj in sorted(by_kind[THREAT_FEED], key=key_of):
        key = key_of(obj)
        try:
            c = compile_feed(obj, config)
        except Refused as e:
            old = last_good.get(key)
            refused(obj, e, old if old is not None and _still_fits(old, (), config) else None)
            continue
        in_force[key] = c
        verdicts[key] = Verdict(True, "Accepted", f"served as feed {key[2]!r}", c.generation)
    feed_names = config | {c.key[2] for c in in_force.values() if c.feed is not None}
    tiers = [t.name for t in files.tiers]
    for obj in sorted(by_kind[GLOBAL_POLICY] + by_kind[POLICY], key=key_of):
        key = key_of(obj)
        try:
            c = compile_policy(obj, tiers, feed_names)
        except Refused as e:
            old = last_good.get(key)
            fits = old is not None and _still_fits(old, tiers, feed_names)
            refused(obj, e, old if fits else None)
            continue
        in_force[key] = c
        n = len(c.rules)
        message = f"{n} rule{'s' if n != 1 else ''} in tier {c.tier!r}, order {c.order}"
        verdicts[key] = Verdict(True, "Accepted", message, c.generation)
    return Judged(
        combine(files, in_force.values()),
        tuple(c.feed for _, c in sorted(in_force.items()) if c.feed is not None),
        verdicts,
        in_force,
    )


def combine(files: policy.Policy, objects: Iterable[Compiled]) -> policy.Policy:
    """The files' policy with each object's rules appended to its tier (rule 3)."""
    by_tier: dict[str, list[Compiled]] = {}
    for c in objects:
        if c.tier is not None:
            by_tier.setdefault(c.tier, []).append(c)
    if not by_tier:
        return files
    tiers = []
    for tier in files.tiers:
        extra = sorted(by_tier.get(tier.name, ()), key=lambda c: (c.order, c.key[2], c.key[1]))
        rules = tier.rules + tuple(r for c in extra for r in c.rules)
        tiers.append(replace(tier, rules=rules))
    return policy.Policy(tuple(tiers), files.default)


def condition(verdict: Verdict, now: str, previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``Accepted`` condition of a verdict; the transition time moves only with the status."""
    status = "True" if verdict.accepted else "False"
    since = now if previous is None or previous.get("status") != status else None
    if since is None and previous is not None:
        since = str(previous.get("lastTransitionTime") or now)
    return {
        "type": CONDITION,
        "status": status,
        "reason": verdict.reason,
        "message": verdict.message,
        "observedGeneration": verdict.generation,
        "lastTransitionTime": since,
    }


def shown_condition(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ``Accepted`` condition the object's status shows now, if any."""
    status = obj.get("status")
    conditions = status.get("conditions") if isinstance(status, dict) else None
    for c in conditions if isinstance(conditions, list) else ():
        if isinstance(c, dict) and c.get("type") == CONDITION:
            return c
    return None


_COMPARED = ("status", "reason", "message", "observedGeneration")


def status_patch(obj: Mapping[str, Any], verdict: Verdict, now: str) -> dict[str, Any] | None:
    """The merge patch of ``status`` saying the verdict; None when the object shows it already.

    A merge patch replaces a list whole: the other conditions the object shows are kept in it.
    """
    shown = shown_condition(obj)
    wanted = condition(verdict, now, shown)
    if shown is not None and all(shown.get(k) == wanted[k] for k in _COMPARED):
        return None
    status = obj.get("status")
    others = [
        c
        for c in ((status or {}).get("conditions") or [] if isinstance(status, dict) else [])
        if isinstance(c, dict) and c.get("type") != CONDITION
    ]
    return {
        "status": {
            "observedGeneration": verdict.generation,
            "conditions": [*others, wanted],
        }
    }
