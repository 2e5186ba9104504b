"""Tests of the per-client record of DNS answers: TTL, replacement, bounds."""

import ipaddress

import pytest

from egressgw.decision.answers import AnswerLog

A = ipaddress.ip_address("10.99.0.2")
B = ipaddress.ip_address("10.99.0.3")


def ip(n: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A destination address numbered n."""
    return ipaddress.ip_address(f"198.51.{n // 256}.{n % 256}")


def test_answer_holds_for_its_ttl_and_for_that_client_only() -> None:
    """The name is known for the client it was served to, until its TTL ends."""
    log = AnswerLog(min_ttl=0)
    log.record(A, "api.test", ip(1), 30, now=100.0)
    assert log.name_of(A, ip(1), 129.9) == "api.test"
    assert log.name_of(B, ip(1), 101.0) is None
    assert log.name_of(A, ip(1), 130.0) is None
    assert len(log) == 0  # the expired entry went when it was met


def test_ttl_zero_still_covers_the_connect_that_follows() -> None:
    """An answer with TTL 0 is kept for min_ttl."""
    log = AnswerLog(min_ttl=5)
    log.record(A, "fast.test", ip(1), 0, now=10.0)
    assert log.name_of(A, ip(1), 14.0) == "fast.test"


def test_recording_again_replaces_name_and_expiry() -> None:
    """The newest answer for a (client, IP) wins."""
    log = AnswerLog(min_ttl=0)
    log.record(A, "old.test", ip(1), 10, now=0.0)
    log.record(A, "new.test", ip(1), 100, now=5.0)
    assert log.name_of(A, ip(1), 50.0) == "new.test"
    assert len(log) == 1


def test_one_client_cannot_evict_others_beyond_its_own_share() -> None:
    """A flood of answers to one client evicts its own oldest, the other's entry stays."""
    log = AnswerLog(max_entries=100, max_per_client=10, min_ttl=0)
    log.record(B, "kept.test", ip(0), 300, now=0.0)
    for n in range(1, 1000):
        log.record(A, f"n{n}.test", ip(n), 300, now=0.0)
    assert log.name_of(B, ip(0), 1.0) == "kept.test"
    assert len(log) == 11
    assert log.name_of(A, ip(999), 1.0) == "n999.test"
    assert log.name_of(A, ip(1), 1.0) is None


def test_total_bound_drops_the_oldest_of_everyone() -> None:
    """Past max_entries the oldest entry goes, whoever it belongs to."""
    log = AnswerLog(max_entries=3, max_per_client=3, min_ttl=0)
    clients = [ipaddress.ip_address(f"10.99.1.{i}") for i in range(5)]
    for i, c in enumerate(clients):
        log.record(c, f"c{i}.test", ip(i), 300, now=0.0)
    assert len(log) == 3 and log.clients() == 3
    assert log.name_of(clients[0], ip(0), 1.0) is None
    assert log.name_of(clients[4], ip(4), 1.0) == "c4.test"


def test_bounds_must_be_positive() -> None:
    """A zero bound is a programming error."""
    with pytest.raises(ValueError):
        AnswerLog(max_entries=0)
