"""Tests of the DNS message core: parsing queries, truncation, TCP framing, blocked answers."""

import contextlib
import ipaddress

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressgw.wire import dnsmsg


def big_answer(query: dns.message.Message, count: int) -> dns.message.Message:
    """An answer to ``query`` with ``count`` A records (about 16 bytes each)."""
    response = dns.message.make_response(query)
    addresses = [f"192.0.2.{i}" for i in range(1, count + 1)]
    response.answer.append(
        dns.rrset.from_text_list(query.question[0].name, 30, "IN", "A", addresses)
    )
    return response


def test_parse_query_takes_one_in_question() -> None:
    """A plain A query parses; its question is lowercase without the final dot."""
    q = dns.message.make_query("Www.Example.TEST.", "A")
    parsed = dnsmsg.parse_query(q.to_wire())
    assert dnsmsg.question(parsed) == ("www.example.test", "A")


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: dns.message.make_response(dns.message.make_query("a.test", "A")), "response"),
        (lambda: dns.message.make_query("a.test", "AXFR"), "zone transfer"),
        (lambda: dns.message.make_query("a.test", "A", rdclass="CH"), "class CH"),
    ],
)
def test_parse_query_refuses_what_it_does_not_forward(make: object, why: str) -> None:
    """Responses, zone transfers and other classes are refused with the reason."""
    msg = make()  # type: ignore[operator]
    with pytest.raises(ValueError, match=why):
        dnsmsg.parse_query(msg.to_wire())


@given(st.binary(max_size=600))
def test_parse_query_contract(data: bytes) -> None:
    """Any bytes: a query back, or ValueError; never another exception."""
    with contextlib.suppress(ValueError):
        dnsmsg.parse_query(data)


def test_formerr_keeps_the_id_and_never_answers_a_response() -> None:
    """FORMERR carries the query's id and QR; a response or a short message gets nothing."""
    wire = bytes.fromhex("abcd0100") + b"\xff" * 20
    reply = dnsmsg.formerr(wire)
    assert reply is not None
    msg = dns.message.from_wire(reply)
    assert (msg.id, msg.rcode(), bool(msg.flags & dns.flags.QR)) == (
        0xABCD,
        dns.rcode.FORMERR,
        True,
    )
    assert dnsmsg.formerr(bytes.fromhex("abcd8100") + b"\0" * 8) is None
    assert dnsmsg.formerr(b"\x01\x02") is None


def test_udp_limit_is_512_without_edns_else_the_advertised_size() -> None:
    """RFC 1035's 512 bytes without EDNS; the EDNS payload size with it (never below 512)."""
    assert dnsmsg.udp_limit(dns.message.make_query("a.test", "A")) == 512
    assert dnsmsg.udp_limit(dns.message.make_query("a.test", "A", use_edns=0, payload=1232)) == 1232
    assert dnsmsg.udp_limit(dns.message.make_query("a.test", "A", use_edns=0, payload=100)) == 512


def test_long_udp_answer_is_cut_with_tc_set() -> None:
    """An answer over the limit is cut to fit, with TC, so the client asks over TCP."""
    query = dns.message.make_query("big.test", "A")
    response = big_answer(query, 60)
    assert len(response.to_wire()) > 512
    wire = dnsmsg.to_udp_wire(response, 512)
    assert len(wire) <= 512
    cut = dns.message.from_wire(wire)
    assert cut.flags & dns.flags.TC
    short = dnsmsg.to_udp_wire(big_answer(query, 3), 512)
    assert not dns.message.from_wire(short).flags & dns.flags.TC


def test_split_tcp_takes_whole_messages_and_keeps_the_rest() -> None:
    """Two framed messages and half of a third: two out, the half kept."""
    a, b, c = b"x" * 20, b"y" * 30, b"z" * 40
    buffer = dnsmsg.to_tcp_wire(a) + dnsmsg.to_tcp_wire(b) + dnsmsg.to_tcp_wire(c)[:10]
    messages, rest = dnsmsg.split_tcp(buffer)
    assert messages == [a, b]
    assert rest == dnsmsg.to_tcp_wire(c)[:10]


def test_blocked_is_nxdomain_or_the_sinkhole_of_the_question_family() -> None:
    """NXDOMAIN without a sinkhole; the sinkhole for A, an empty NOERROR for AAAA."""
    a = dns.message.make_query("evil.test", "A")
    assert dnsmsg.blocked(a, None).rcode() == dns.rcode.NXDOMAIN
    sink = dnsmsg.blocked(a, ipaddress.ip_address("0.0.0.0"))
    assert sink.rcode() == dns.rcode.NOERROR
    assert [r.data for r in dnsmsg.answer_records(sink)] == ["0.0.0.0"]
    aaaa = dnsmsg.blocked(
        dns.message.make_query("evil.test", "AAAA"), ipaddress.ip_address("0.0.0.0")
    )
    assert (aaaa.rcode(), aaaa.answer) == (dns.rcode.NOERROR, [])


def test_answer_records_lists_cnames_and_addresses_in_order() -> None:
    """CNAME then A records, names lowercase without the final dot, TTLs kept."""
    query = dns.message.make_query("www.shop.test", "A")
    response = dns.message.make_response(query)
    response.answer.append(
        dns.rrset.from_text("www.shop.test.", 300, "IN", "CNAME", "CDN.Evil.TEST.")
    )
    response.answer.append(dns.rrset.from_text("cdn.evil.test.", 20, "IN", "A", "192.0.2.7"))
    records = dnsmsg.answer_records(response)
    assert [(r.name, r.type, r.ttl, r.data) for r in records] == [
        ("www.shop.test", "CNAME", 300, "cdn.evil.test"),
        ("cdn.evil.test", "A", 20, "192.0.2.7"),
    ]
    assert records[1].ip == ipaddress.ip_address("192.0.2.7")


def test_parse_response_refuses_an_answer_to_another_query() -> None:
    """An answer whose id or question differs from the query's is refused."""
    query = dns.message.make_query("a.test", "A")
    other = dns.message.make_response(dns.message.make_query("b.test", "A"))
    with pytest.raises(ValueError, match="another query"):
        dnsmsg.parse_response(other.to_wire(), query)
    ok = dns.message.make_response(query)
    assert dnsmsg.parse_response(ok.to_wire(), query).id == query.id
