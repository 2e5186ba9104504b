"""Feed matches as the gateway uses them: the feeds library's matcher -> ECS-ready dicts.

``MatcherThreats`` matches with the matcher it was last given and counts the matchers it has had
in ``generation``: the decision path replays cached outcomes only while that number stays the
same. The gateway calls ``refresh()`` after every feed update (the feed manager swaps its matcher
whole, then reports), so the flow after an update is decided, and cached, with the new matcher.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from egressgw.flow import ip_text
from feeds.matcher import Match, Matcher

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def to_threat_match(m: Match, field: str) -> dict[str, Any]:
    """One match as an ECS threat enrichment (with the feed name beside it)."""
    indicator: dict[str, Any] = {"type": m.ecs_type, "description": f"{m.why}: {m.indicator}"}
    if m.ecs_type in ("ipv4-addr", "ipv6-addr"):
        indicator["ip"] = m.matched
        if m.indicator != m.matched:
            indicator["description"] = f"{m.matched} in {m.indicator}"
    elif m.ecs_type == "url":
        indicator["url"] = {"full": m.indicator}
    else:
        indicator["url"] = {"domain": m.indicator}
    if m.confidence is not None:
        indicator["confidence"] = (
            "High" if m.confidence >= 70 else "Medium" if m.confidence >= 40 else "Low"
        )
    if m.first_seen is not None:
        indicator["first_seen"] = m.first_seen.isoformat()
    if m.reference:
        indicator["reference"] = m.reference
    return {
        "feed": m.feed,
        "indicator": indicator,
        "matched": {"atomic": m.matched, "field": field, "type": "indicator_match_rule"},
        "why": m.why,
    }


class MatcherThreats:
    """The gateway's ThreatSource over the current feeds matcher."""

    def __init__(self, current: Callable[[], Matcher]) -> None:
        self._current = current
        self._matcher = current()
        self.generation = 0

    def refresh(self) -> bool:
        """Take the current matcher if it changed (and bump ``generation``); True if it did."""
        matcher = self._current()
        if matcher is self._matcher:
            return False
        self._matcher = matcher
        self.generation += 1
        return True

    def match_name(self, name: str) -> tuple[dict[str, Any], ...]:
        """Matches for a destination name (or a CNAME or SNI standing for it)."""
        # Every name here is canonical already (decision.names for hosts and SNI, lowercased
        # without the final dot for CNAMEs), so the matcher's entry point that skips its own
        # normalisation gives the same answer, faster.
        matches = self._matcher.match_canonical_domain(name)
        return tuple(to_threat_match(m, "destination.domain") for m in matches)

    def match_ip(self, ip: IPAddress) -> tuple[dict[str, Any], ...]:
        """Matches for a destination address."""
        # The matcher's fast path takes the dotted-quad text.
        matches = self._matcher.match_ip(ip_text(ip))
        return tuple(to_threat_match(m, "destination.ip") for m in matches)

    def match_url(self, url: str) -> tuple[dict[str, Any], ...]:
        """Matches for a plain-HTTP URL."""
        return tuple(to_threat_match(m, "url.full") for m in self._matcher.match_url(url))
