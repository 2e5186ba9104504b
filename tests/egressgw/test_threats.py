"""Tests of feed matches turned into ECS threat enrichments."""

from egressgw.threats import to_threat_match
from feeds.indicator import IndicatorType
from feeds.matcher import Match


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
