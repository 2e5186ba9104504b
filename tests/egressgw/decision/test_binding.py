"""Tests of the name/address binding of transparent flows (pure core): which name policy judges."""

import ipaddress

from egressgw.decision.binding import classify_binding

IP = ipaddress.ip_address("203.0.113.10")
OTHER = ipaddress.ip_address("203.0.113.11")


def test_no_claimed_name_is_decided_by_address() -> None:
    """Without a name and without a DNS answer, policy sees the address alone."""
    b = classify_binding(None, IP, None, None)
    assert (b.name, b.refusal) == (None, None)
    assert b.how == "address only"


def test_no_claimed_name_takes_the_name_the_client_resolved() -> None:
    """Without a name, the name the DNS proxy gave this address for is judged."""
    b = classify_binding(None, IP, "API.Partner.test.", None)
    assert (b.name, b.refusal) == ("api.partner.test", None)


def test_claimed_name_that_resolves_to_the_address_is_bound() -> None:
    """A name whose resolution includes the original address is judged."""
    b = classify_binding("good.test", IP, None, (OTHER, IP))
    assert (b.name, b.refusal) == ("good.test", None)
    assert b.how == "claimed, resolves there"


def test_claimed_name_the_dns_proxy_answered_is_bound_without_resolving() -> None:
    """The gateway's own answer to this client binds the name, whatever the resolver says."""
    b = classify_binding("Good.test", IP, "good.test.", None)
    assert (b.name, b.refusal) == ("good.test", None)
    assert b.how == "claimed, DNS answer"


def test_spoofed_name_on_another_address_is_refused_with_a_reason() -> None:
    """An SNI of a permitted name on an address it does not resolve to is refused."""
    b = classify_binding("good.test", OTHER, None, (IP,))
    assert b.name is None
    assert b.refusal == (
        "name good.test is not bound to 203.0.113.11: it resolves to 203.0.113.10, and no DNS "
        "answer of the gateway gave 203.0.113.11 to this client for it"
    )


def test_a_dns_answer_for_another_name_binds_nothing() -> None:
    """The client was told the address for one name: claiming another is still refused."""
    b = classify_binding("good.test", OTHER, "other.test", (IP,))
    assert b.refusal is not None and "not bound to 203.0.113.11" in b.refusal


def test_a_name_that_does_not_resolve_is_refused_saying_why() -> None:
    """A name the resolver cannot answer binds to nothing; the reason keeps the DNS error."""
    b = classify_binding("nowhere.test", IP, None, None, "dns: nowhere.test: NXDOMAIN")
    assert b.refusal is not None
    assert "does not resolve (dns: nowhere.test: NXDOMAIN)" in b.refusal
