"""Tests of feeds.stix: pattern subset, validity window, revocation, versions."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from feeds.indicator import IndicatorType
from feeds.options import ParseOptions
from feeds.stix import extract_values, parse_stix

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _bundle(*objects: dict[str, Any]) -> bytes:
    return orjson.dumps({"type": "bundle", "id": "bundle--1", "objects": list(objects)})


def _indicator(pattern: str, **extra: Any) -> dict[str, Any]:
    obj = {
        "type": "indicator",
        "spec_version": "2.1",
        "id": extra.pop("id", "indicator--1"),
        "pattern": pattern,
        "pattern_type": "stix",
        "valid_from": "2020-01-01T00:00:00Z",
        "modified": "2020-01-01T00:00:00Z",
    }
    obj.update(extra)
    return obj


def test_or_chain_splits_into_independent_indicators() -> None:
    """Each side of an OR is its own indicator, with its own kind."""
    values, skipped = extract_values(
        "[domain-name:value = 'a.example' OR ipv4-addr:value = '1.2.3.4' OR url:value = "
        "'http://x.example/p']"
    )
    assert values == [
        ("a.example", IndicatorType.DOMAIN),
        ("1.2.3.4", IndicatorType.CIDR),
        ("http://x.example/p", IndicatorType.URL),
    ]
    assert skipped == 0


@pytest.mark.parametrize(
    "pattern",
    [
        "[x509-certificate:issuer = 'CN=WEBMAIL' AND x509-certificate:serial_number = '4c']",
        "[ipv4-addr:value = '1.2.3.4'] AND [domain-name:value = 'a.example']",
        "[ipv4-addr:value = '1.2.3.4'] FOLLOWEDBY [domain-name:value = 'a.example']",
        "[ipv4-addr:value = '1.2.3.4'] WITHIN 600 SECONDS",
        "[file:hashes.'SHA-256' = 'abc']",
        "[domain-name:value LIKE '%.example.com']",
    ],
)
def test_unenforceable_patterns_are_skipped(pattern: str) -> None:
    """AND across objects, sequences, qualifiers, hashes and LIKE yield nothing, counted."""
    values, skipped = extract_values(pattern)
    assert values == [] and skipped >= 1


def test_network_traffic_pair_reduces_to_ip() -> None:
    """misp2stix2's dst_ref.type AND dst_ref.value pair is the IP it names."""
    values, _ = extract_values(
        "[network-traffic:dst_ref.type = 'ipv4-addr' AND "
        "network-traffic:dst_ref.value = '91.208.184.110']"
    )
    assert values == [("91.208.184.110", None)]


def test_in_list_and_escapes() -> None:
    """IN (...) yields each value; \\' inside a string is a quote."""
    values, _ = extract_values("[domain-name:value IN ('a.example', 'b\\'c.example')]")
    assert [v for v, _ in values] == ["a.example", "b'c.example"]


def test_syntax_error_raises() -> None:
    """A pattern that is not STIX raises ValueError."""
    with pytest.raises(ValueError):
        extract_values("ipv4-addr:value = '1.2.3.4'")


def test_validity_window_and_revocation() -> None:
    """Expired, not-yet-valid and revoked indicators are dropped and counted."""
    body = _bundle(
        _indicator("[ipv4-addr:value = '1.1.1.1']", id="indicator--a"),
        _indicator(
            "[ipv4-addr:value = '2.2.2.2']", id="indicator--b", valid_until="2021-01-01T00:00:00Z"
        ),
        _indicator(
            "[ipv4-addr:value = '3.3.3.3']", id="indicator--c", valid_from="2027-01-01T00:00:00Z"
        ),
        _indicator("[ipv4-addr:value = '4.4.4.4']", id="indicator--d", revoked=True),
    )
    result = parse_stix(body, now=NOW)
    assert [i.value for i in result.indicators] == ["1.1.1.1"]
    assert result.dropped == {"expired": 1, "not-yet-valid": 1, "revoked": 1}
    kept = parse_stix(body, now=NOW, options=ParseOptions(ignore_valid_until=True))
    assert "2.2.2.2" in {i.value for i in kept.indicators}


def test_valid_until_equal_to_valid_from_is_flagged_not_expired() -> None:
    """valid_until == valid_from is invalid: noted, and the indicator is kept."""
    body = _bundle(_indicator("[ipv4-addr:value = '1.1.1.1']", valid_until="2020-01-01T00:00:00Z"))
    result = parse_stix(body, now=NOW)
    assert len(result.indicators) == 1
    assert result.notes["valid_until-not-after-valid_from"] == 1


def test_newest_version_wins() -> None:
    """Of several versions of one id, the newest 'modified' is the one used."""
    body = _bundle(
        _indicator("[ipv4-addr:value = '1.1.1.1']", modified="2020-01-02T00:00:00Z"),
        _indicator("[ipv4-addr:value = '9.9.9.9']", modified="2020-01-03T00:00:00Z"),
        _indicator("[ipv4-addr:value = '5.5.5.5']", modified="2020-01-01T00:00:00Z"),
    )
    assert [i.value for i in parse_stix(body, now=NOW).indicators] == ["9.9.9.9"]


def test_non_stix_pattern_types_ignored_and_provenance_kept() -> None:
    """pattern_type snort is ignored; confidence, id and labels become provenance."""
    body = _bundle(
        _indicator("alert tcp any any", id="indicator--s", pattern_type="snort"),
        _indicator(
            "[domain-name:value = 'c2.example']",
            id="indicator--p",
            confidence=85,
            indicator_types=["malicious-activity"],
        ),
    )
    result = parse_stix(body, now=NOW)
    assert result.ignored == 1
    prov = result.indicators[0].provenance
    assert (prov.confidence, prov.reference, prov.tags) == (
        85,
        "indicator--p",
        ("malicious-activity",),
    )


def test_oasis_sample_details(samples: Path) -> None:
    """The OASIS sample: CIDRs kept, 10.0.0.0 dropped, the spaced domain rejected, AND skipped."""
    data = (samples / "stix21_oasis_examples_indicators_bundle.json").read_bytes()
    result = parse_stix(data, now=NOW)
    values = {i.value for i in result.indicators}
    assert "223.166.0.0/15" in values and "www.webserver.dynssl.com" in values
    assert "10.0.0.0" not in values and result.dropped == {"private": 1}
    assert [s.text for s in result.samples] == ["domain autuo.xicp.net"]
    assert result.notes["unsupported-pattern-terms"] == 1
