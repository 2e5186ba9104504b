"""Tests of the destination guard (pure core)."""

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressgw.decision.guard import Guard, classify_ip, embedded_ipv4


@pytest.mark.parametrize(
    ("address", "category"),
    [
        ("169.254.169.254", "cloud-metadata"),
        ("fd00:ec2::254", "cloud-metadata"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.31.255.255", "private"),
        ("192.168.0.1", "private"),
        ("fd12::1", "private"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "cgnat"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "cloud-metadata"),
        ("64:ff9b::a00:1", "private"),
        ("2002:a00:1::", "private"),
        ("93.184.216.34", None),
        ("2606:4700::1111", None),
        ("172.32.0.1", None),
    ],
)
def test_classify_ip(address: str, category: str | None) -> None:
    """Each guarded range is reported with its category; public addresses are not."""
    assert classify_ip(ipaddress.ip_address(address)) == category


def test_allow_exempts_a_range_but_not_others() -> None:
    """guard.allow lets listed ranges through and still denies the rest, with a guard: reason."""
    guard = Guard(allow=[ipaddress.ip_network("127.0.0.16/28")])
    assert guard.check(ipaddress.ip_address("127.0.0.20")) is None
    assert guard.check(ipaddress.ip_address("127.0.0.99")) == "guard: 127.0.0.99 is loopback"


def test_allow_applies_to_mapped_form() -> None:
    """An IPv4-mapped address is judged by its IPv4 address, for allow and deny alike."""
    guard = Guard(allow=[ipaddress.ip_network("127.0.0.16/28")])
    assert guard.check(ipaddress.ip_address("::ffff:127.0.0.20")) is None
    reason = guard.check(ipaddress.ip_address("::ffff:127.0.0.99"))
    assert reason == "guard: ::ffff:7f00:63 (IPv4 127.0.0.99) is loopback"


def test_disabled_guard_allows_everything() -> None:
    """A disabled guard (guard.enabled: false) denies nothing."""
    assert Guard(enabled=False).check(ipaddress.ip_address("169.254.169.254")) is None


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_mapped_ipv6_agrees_with_ipv4(value: int) -> None:
    """Every IPv4 address gets the same category in its IPv4-mapped IPv6 spelling."""
    v4 = ipaddress.IPv4Address(value)
    mapped = ipaddress.IPv6Address(0xFFFF00000000 | value)
    assert embedded_ipv4(mapped) == v4
    assert classify_ip(mapped) == classify_ip(v4)
