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


@pytest.mark.parametrize(
    ("address", "category"),
    [
        # deprecated site-local and local-use NAT64
        ("fec0::1", "private"),
        ("feff:ffff::1", "private"),
        ("64:ff9b:1::a00:1", "private"),
        ("64:ff9b:1:ffff::808:808", "private"),
        # deprecated 6to4 relay anycast; limited broadcast
        ("192.88.99.1", "reserved"),
        ("192.88.98.255", None),
        ("192.88.100.0", None),
        ("255.255.255.255", "reserved"),
        # IETF protocol assignments 2001::/23 (outside Teredo), and the next allocation
        ("2001:2::1", "reserved"),
        ("2001:1::1", "reserved"),
        ("2001:10::1", "reserved"),
        ("2001:1ff:ffff::1", "reserved"),
        ("2001:200::1", None),
        # outside 2000::/3: discard-only, dummy, SRv6 SIDs, unassigned
        ("100::1", "reserved"),
        ("100:0:0:1::1", "reserved"),
        ("5f00::1", "reserved"),
        ("64:ff9b:2::1", "reserved"),
        ("4000::1", "reserved"),
        ("1fff:ffff::1", "reserved"),
        ("2000::1", None),
        ("3fff:ffff::1", None),
        # SIIT IPv4-translated and Teredo carry an IPv4 address
        ("::ffff:0:7f00:1", "loopback"),
        ("::ffff:0:a9fe:a9fe", "cloud-metadata"),
        ("::ffff:0:808:808", None),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # client 127.0.0.1
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "private"),  # client 10.0.0.1
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", None),  # client 8.8.8.8
    ],
)
def test_classify_ip_special_purpose(address: str, category: str | None) -> None:
    """Registry ranges added to the guard are refused by category; their neighbours are not."""
    assert classify_ip(ipaddress.ip_address(address)) == category


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("fec0::1", "guard: fec0::1 is private"),
        ("64:ff9b:1::a00:1", "guard: 64:ff9b:1::a00:1 is private"),
        ("100::1", "guard: 100::1 is reserved"),
        ("::ffff:0:a00:1", "guard: ::ffff:0:a00:1 (IPv4 10.0.0.1) is private"),
        (
            "2001:0:4136:e378:8000:63bf:5601:fefe",
            "guard: 2001:0:4136:e378:8000:63bf:5601:fefe (IPv4 169.254.1.1) is link-local",
        ),
    ],
)
def test_new_ranges_denied_with_reason(address: str, reason: str) -> None:
    """The guard's reason names the address, the IPv4 address it carries, and the category."""
    assert Guard().check(ipaddress.ip_address(address)) == reason


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


# Each IPv6 spelling of an IPv4 address, as a function of the address's 32 bits.
SPELLINGS = {
    "mapped": lambda v: 0xFFFF << 32 | v,
    "translated": lambda v: 0xFFFF0000 << 32 | v,
    "nat64": lambda v: 0x64FF9B << 96 | v,
    "6to4": lambda v: 0x2002 << 112 | v << 80 | 0x1234,
    # Teredo server 65.54.227.120, flags and port arbitrary, client address inverted
    "teredo": lambda v: 0x20010000 << 96 | 0x4136E378 << 64 | 0x800063BF << 32 | v ^ 0xFFFFFFFF,
}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
@given(value=st.integers(min_value=0, max_value=2**32 - 1))
def test_ipv6_spellings_agree_with_ipv4(spelling: str, value: int) -> None:
    """Every IPv4 address gets the same category in each IPv6 spelling that carries it."""
    v4 = ipaddress.IPv4Address(value)
    v6 = ipaddress.IPv6Address(SPELLINGS[spelling](value))
    assert embedded_ipv4(v6) == v4
    assert classify_ip(v6) == classify_ip(v4)


@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_ipv6_outside_global_unicast_is_never_public(value: int) -> None:
    """IPv6 outside 2000::/3 is always guarded, unless it carries a public IPv4 address."""
    ip = ipaddress.IPv6Address(value)
    if value >> 125 != 0b001 and embedded_ipv4(ip) is None:
        assert classify_ip(ip) is not None


@given(st.integers(min_value=0, max_value=2**80 - 1))
def test_local_use_nat64_is_private_whatever_it_carries(value: int) -> None:
    """Every address in 64:ff9b:1::/48 is private: its IPv4 position depends on the setup."""
    ip = ipaddress.IPv6Address(0x0064FF9B0001 << 80 | value)
    assert embedded_ipv4(ip) is None
    assert classify_ip(ip) == "private"
