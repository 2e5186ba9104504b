"""Tests of feed matches turned into ECS threat enrichments."""

import ipaddress

from egressgw.threats import MatcherThreats, to_threat_match
from feeds.indicator import Indicator, IndicatorType, Provenance
from feeds.matcher import FeedRules, Match, Matcher


def test_network_match() -> None:
    """An address inside a listed network: indicator ip, description, confidence bucket."""
    m = Match("drop", IndicatorType.CIDR, "198.51.100.0/24", "198.51.100.7", "in network", 80)
    t = to_threat_match(m, "destination.ip")
    assert t["feed"] == "drop"
    assert t["indicator"] == {
        "type": "ipv4-addr",
        "ip": "198.51.100.7",
        "description": "198.51.100.7 in 198.51.100.0/24",
        "confidence": "High",
    }
    assert t["matched"] == {
        "atomic": "198.51.100.7",
        "field": "destination.ip",
        "type": "indicator_match_rule",
    }


def test_parent_domain_match() -> None:
    """A name below a listed domain names the listed domain and why."""
    m = Match("bad", IndicatorType.DOMAIN, "evil.test", "a.evil.test", "parent domain", 30)
    t = to_threat_match(m, "destination.domain")
    assert t["indicator"]["url"] == {"domain": "evil.test"}
    assert t["indicator"]["description"] == "parent domain: evil.test"
    assert t["indicator"]["confidence"] == "Low"
    assert t["matched"]["atomic"] == "a.evil.test"


def test_matcher_threats_follow_a_swapped_matcher_and_count_it() -> None:
    """refresh() takes the feed manager's new matcher and moves generation; nothing new: no move."""
    ip = ipaddress.ip_address("198.51.100.7")
    listing = Indicator(IndicatorType.IP, "198.51.100.7", Provenance("drop"))
    current = [Matcher.empty()]
    threats = MatcherThreats(lambda: current[0])
    assert threats.match_ip(ip) == () and threats.generation == 0
    assert threats.refresh() is False and threats.generation == 0
    current[0] = Matcher.build([(FeedRules("drop"), [listing])])
    assert threats.refresh() is True and threats.generation == 1
    assert [t["feed"] for t in threats.match_ip(ip)] == ["drop"]
