"""Tests of feeds.normalise: canonical forms and hygiene rules."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feeds.normalise import (
    is_public_suffix,
    normalise_domain,
    normalise_ip,
    normalise_network,
    normalise_url,
    special_range,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("www.TradeInsights.net", "www.tradeinsights.net"),
        ("bücher.de", "xn--bcher-kva.de"),
        ("BÜCHER.de", "xn--bcher-kva.de"),
        ("icloud-id.xn--q9jyb4c", "icloud-id.xn--q9jyb4c"),
        ("geoff_mulligan.falconshar.com", "geoff_mulligan.falconshar.com"),
        ("192.168.112.2o7.net", "192.168.112.2o7.net"),
        ("例え。テスト", "xn--r8jz45g.xn--zckzah"),
    ],
)
def test_normalise_domain_canonical_forms(raw: str, expected: str) -> None:
    """Case, one trailing dot, IDNA and full-width dots normalise to one A-label form."""
    assert normalise_domain(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty"),
        ("localhost", "single-label"),
        ("domain autuo.xicp.net", "invalid character"),
        ("http://x.com/", "invalid character"),
        ("a..b.com", "empty label"),
        ("example.com..", "empty label"),
        ("a" * 64 + ".com", "label longer"),
        (("a" * 60 + ".") * 5 + "com", "longer than 253"),
        ("1.2.3.4", "numeric top-level"),
        ("xn--zz.com", "punycode"),
        ("user@example.com", "invalid character"),
    ],
)
def test_normalise_domain_rejects_with_reason(raw: str, reason: str) -> None:
    """Invalid names raise ValueError whose message says why."""
    with pytest.raises(ValueError, match=reason):
        normalise_domain(raw)


_label = st.from_regex(r"[a-z0-9_][a-z0-9_-]{0,20}", fullmatch=True)


@settings(deadline=None)
@given(st.lists(_label, min_size=1, max_size=4), st.sampled_from(["com", "net", "de", "co.uk"]))
def test_normalise_domain_idempotent_and_case_insensitive(labels: list[str], tld: str) -> None:
    """Normalising twice changes nothing, and case or a trailing dot never matters."""
    name = ".".join([*labels, tld])
    once = normalise_domain(name)
    assert normalise_domain(once) == once
    assert normalise_domain(name.upper() + ".") == once


@settings(deadline=None)
@given(st.text(min_size=1, max_size=80))
def test_normalise_domain_contract(text: str) -> None:
    """Any text either normalises to an ASCII lowercase name or raises ValueError."""
    try:
        out = normalise_domain(text)
    except ValueError:
        return
    assert out.isascii() and out == out.lower() and "." in out and len(out) <= 253


@pytest.mark.parametrize(
    ("raw", "expected", "masked"),
    [
        ("1.2.3.4", "1.2.3.4", False),
        ("1.2.3.4/32", "1.2.3.4", False),
        ("1.2.3.4/24", "1.2.3.0/24", True),
        ("::ffff:1.2.3.4", "1.2.3.4", False),
        ("::ffff:1.2.3.0/120", "1.2.3.0/24", False),
        ("fe80::1%lo0", "fe80::1", False),
        ("2A06:E480::/29", "2a06:e480::/29", False),
    ],
)
def test_normalise_network(raw: str, expected: str, masked: bool) -> None:
    """Networks are canonical: host /32 bare, mapped IPv6 to IPv4, zone dropped, bits masked."""
    assert normalise_network(raw) == (expected, masked)


@pytest.mark.parametrize("raw", ["09.193.105.79", "1.2.3", "0274.01.034.0117", "1.2.3.4/33", "x"])
def test_normalise_ip_rejects_ambiguous_forms(raw: str) -> None:
    """Leading zeros, short and octal forms are rejected, never guessed."""
    with pytest.raises(ValueError):
        normalise_ip(raw)


@settings(deadline=None)
@given(st.ip_addresses())
def test_normalise_ip_round_trips(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    """Every address normalises to a form that parses back to the same (or mapped) address."""
    out = normalise_ip(str(addr))
    expected = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
    assert ipaddress.ip_address(out) == (expected or addr)
    assert normalise_ip(out) == out


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("HTTP://Example.COM:80/A?b=C", "http://example.com/A?b=C"),
        ("https://user:pw@example.com:443", "https://example.com/"),
        ("http://example.com:8080/x#frag", "http://example.com:8080/x"),
        ("http://[2001:DB8::1]:8080/p", "http://[2001:db8::1]:8080/p"),
        ("http://bücher.de/contrase%C3%B1a", "http://xn--bcher-kva.de/contrase%C3%B1a"),
        ("http://182.126.120.150:58801/i", "http://182.126.120.150:58801/i"),
        ("https://a.com/x?u=a@b.com", "https://a.com/x?u=a@b.com"),
    ],
)
def test_normalise_url(raw: str, expected: str) -> None:
    """Scheme/host lowercased, IDNA host, default port and userinfo dropped, path verbatim."""
    assert normalise_url(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "javascript:alert(1)",
        "http://",
        "http://3154189391/",
        "http://a.com/ x",
        "http://[1.2.3.4]/",
    ],
)
def test_normalise_url_rejects(raw: str) -> None:
    """URLs without a valid host, with spaces, odd schemes or integer hosts are rejected."""
    with pytest.raises(ValueError):
        normalise_url(raw)


def test_public_suffixes_recognised_offline() -> None:
    """ICANN and private public suffixes are known; registrable names are not suffixes."""
    assert is_public_suffix("com") and is_public_suffix("co.uk") and is_public_suffix("pages.dev")
    assert not is_public_suffix("example.com")


@pytest.mark.parametrize(
    ("net", "reason"),
    [
        ("10.0.0.0/8", "private"),
        ("192.168.1.101/32", "private"),
        ("0.0.0.0/8", "unspecified"),
        ("0.0.0.0/0", "unspecified"),
        ("fe80::/64", "link-local"),
        ("8.8.8.8/32", None),
        ("2a06:e480::/29", None),
    ],
)
def test_special_range(net: str, reason: str | None) -> None:
    """A network overlapping special-purpose space is named; public space is not."""
    assert special_range(ipaddress.ip_network(net)) == reason
