"""Tests of destination name canonicalisation (pure core)."""

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressgw.decision.names import Host, normalise_name, parse_authority, parse_host, parse_ip_port


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("bücher.test", "xn--bcher-kva.test"),
        ("BÜCHER.test.", "xn--bcher-kva.test"),
        ("\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.test", "example.test"),  # full-width
        ("under_score.example", "under_score.example"),
    ],
)
def test_normalise_name(raw: str, canonical: str) -> None:
    """Case, trailing dot, full-width forms and IDN all reach one A-label spelling."""
    assert normalise_name(raw) == canonical


@pytest.mark.parametrize(
    "raw", ["", ".", "a..b", "-a.test", "a b.test", "a/b.test", "2130706433", "0x7f.1", "1.2.3.0x4"]
)
def test_normalise_name_rejects(raw: str) -> None:
    """Empty labels, spaces, slashes and numeric spellings of addresses are refused."""
    with pytest.raises(ValueError):
        normalise_name(raw)


def test_parse_authority_forms() -> None:
    """Names, IPv4 and bracketed IPv6 literals parse with their port."""
    assert parse_authority("Allowed.Test.:8443") == (Host("allowed.test", None), 8443)
    assert parse_authority("127.0.0.66:80") == (Host(None, ipaddress.ip_address("127.0.0.66")), 80)
    host, port = parse_authority("[::ffff:127.0.0.66]:8443")
    assert host.ip == ipaddress.ip_address("::ffff:127.0.0.66") and port == 8443
    assert parse_authority("example.test", default_port=80)[1] == 80


@pytest.mark.parametrize(
    "raw",
    ["a@b.test:80", "b.test:0", "b.test:70000", "b.test:x", "::1:80", "[::1", "[fe80::1%lo]:1"],
)
def test_parse_authority_rejects(raw: str) -> None:
    """Userinfo, bad ports, unbracketed IPv6 and zone ids are refused."""
    with pytest.raises(ValueError):
        parse_authority(raw)


@given(st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9](\.[a-z][a-z0-9]{0,10}){1,3}", fullmatch=True))
def test_normalise_is_idempotent_and_case_blind(name: str) -> None:
    """Normalising twice changes nothing, and case never matters."""
    once = normalise_name(name.upper())
    assert normalise_name(once) == once == name


@given(st.ip_addresses())
def test_ip_literals_round_trip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    """Every IP address, in its literal spelling, parses back to itself."""
    text = f"[{ip}]" if ip.version == 6 else str(ip)
    assert parse_host(text).ip == ip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:3128", ("127.0.0.1", 3128)),
        ("[::1]:53", ("::1", 53)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("10.0.0.1", ("10.0.0.1", 53)),
        ("[::1]", ("::1", 53)),
        ("::1", ("::1", 53)),
    ],
)
def test_parse_ip_port(text: str, expected: tuple[str, int]) -> None:
    """Listen and nameserver addresses: every spelling the config accepts, IPv6 in brackets."""
    ip, port = parse_ip_port(text, 53 if text.count(":") != 1 or text.endswith("]") else None)
    assert (str(ip), port) == expected


@pytest.mark.parametrize("text", ["localhost:53", "::1:53", "1.2.3.4:", "1.2.3.4:65536", "1.2.3.4"])
def test_parse_ip_port_refuses(text: str) -> None:
    """Names, unbracketed IPv6 with a port, bad ports and (without a default) no port fail."""
    with pytest.raises(ValueError):
        parse_ip_port(text)
