"""Tests of the DNS fast-path reader: it reads what dnspython reads, for what the proxy needs."""

import contextlib
import ipaddress

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressgw.wire import dnsmsg, dnsread

# Labels of any bytes (dnspython escapes the odd ones; the reader must write them the same way).
LABEL = st.binary(min_size=1, max_size=20)
NAME = st.lists(LABEL, min_size=0, max_size=5).map(lambda labels: dns.name.Name([*labels, b""]))
QTYPES = st.sampled_from(["A", "AAAA", "CNAME", "MX", "TXT", "SRV", "HTTPS", "PTR", "ANY"])
PAYLOAD = st.one_of(st.none(), st.integers(0, 65535))


def make_query(name: dns.name.Name, qtype: str, payload: int | None) -> dns.message.Message:
    """A query for ``name``, with EDNS advertising ``payload`` when it is not None."""
    if payload is None:
        return dns.message.make_query(name, qtype)
    return dns.message.make_query(name, qtype, use_edns=0, payload=payload)


@settings(deadline=None)  # no timing: CI runs loaded
@given(NAME, QTYPES, PAYLOAD)
def test_query_reads_as_dnspython_reads_it(
    name: dns.name.Name, qtype: str, payload: int | None
) -> None:
    """Name (lowercase, escaped), type, id and UDP size: the same as the dnspython path."""
    q = make_query(name, qtype, payload)
    wire = q.to_wire()
    parsed = dnsmsg.parse_query(wire)
    got = dnsread.read_query(wire)
    assert (got.name, dns.rdatatype.to_text(got.qtype)) == dnsmsg.question(parsed)
    assert got.id == q.id
    assert got.udp_limit == dnsmsg.udp_limit(parsed)
    assert got.question_end == 12 + len(name.to_wire()) + 4


@settings(deadline=None)  # no timing: CI runs loaded
@given(st.binary(max_size=300))
def test_query_reader_contract(data: bytes) -> None:
    """Any bytes: a Query or ValueError; whatever dnspython takes as a query, the reader takes."""
    try:
        parsed = dnsmsg.parse_query(data)
    except ValueError:
        with contextlib.suppress(ValueError):
            dnsread.read_query(data)
        return
    got = dnsread.read_query(data)
    assert (got.name, dns.rdatatype.to_text(got.qtype)) == dnsmsg.question(parsed)


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: dns.message.make_response(dns.message.make_query("a.test", "A")), "response"),
        (lambda: dns.message.make_query("a.test", "AXFR"), "zone transfer"),
        (lambda: dns.message.make_query("a.test", "A", rdclass="CH"), "class 3"),
    ],
)
def test_query_reader_refuses_what_the_proxy_does_not_forward(make: object, why: str) -> None:
    """Responses, zone transfers and other classes are refused with the reason."""
    msg = make()  # type: ignore[operator]
    with pytest.raises(ValueError, match=why):
        dnsread.read_query(msg.to_wire())


def test_query_reader_refuses_a_pointer_loop_and_bytes_after_the_message() -> None:
    """A compression pointer to itself, and trailing bytes, are not a query."""
    head = bytes.fromhex("abcd0100 0001 0000 0000 0000")
    with pytest.raises(ValueError, match="backwards"):
        dnsread.read_query(head + b"\xc0\x0c\x00\x01\x00\x01")
    good = dns.message.make_query("a.test", "A").to_wire()
    with pytest.raises(ValueError, match="after the last record"):
        dnsread.read_query(good + b"\x00")


RECORD = st.one_of(
    st.tuples(st.just("A"), st.ip_addresses(v=4).map(str)),
    st.tuples(st.just("AAAA"), st.ip_addresses(v=6).map(str)),
    st.tuples(st.just("CNAME"), NAME.map(lambda n: n.to_text())),
    st.tuples(st.just("TXT"), st.just('"some text"')),
    st.tuples(st.just("MX"), st.just("10 mail.example.test.")),
)


# One record per (owner, type): dnspython merges the records of an RRset wherever they stand.
ANSWERS = st.lists(
    st.tuples(NAME, st.integers(0, 2**31 - 1), RECORD),
    max_size=6,
    unique_by=lambda t: (t[0], t[2][0]),
)


@settings(deadline=None)  # no timing: CI runs loaded
@given(NAME, ANSWERS)
def test_response_records_read_as_dnspython_reads_them(
    qname: dns.name.Name, answers: list[tuple[dns.name.Name, int, tuple[str, str]]]
) -> None:
    """A, AAAA and CNAME of the answer section (names compressed by dnspython), others skipped."""
    query = dns.message.make_query(qname, "A", use_edns=0)
    response = dns.message.make_response(query)
    for owner, ttl, (kind, data) in answers:
        response.answer.append(dns.rrset.from_text(owner, ttl, "IN", kind, data))
    response.additional.append(dns.rrset.from_text("ns.test.", 30, "IN", "A", "192.0.2.1"))
    wire = response.to_wire()
    parsed = dnsmsg.answer_records(dns.message.from_wire(wire))
    got = dnsread.read_response(wire)
    assert list(got.records) == parsed
    assert [r.ip for r in got.records] == [r.ip for r in parsed]
    assert got.question == (dnsmsg.name_text(qname), 1, 1)
    assert got.id == query.id and got.rcode == 0


def test_ipv4_mapped_and_compatible_aaaa_read_as_dnspython_writes_them() -> None:
    """The AAAA text is dnspython's (RFC 5952's dotted tail), whatever Python's ipaddress says."""
    query = dns.message.make_query("a.test", "AAAA")
    response = dns.message.make_response(query)
    for address in ("::ffff:0.0.0.0", "::1.2.3.4", "2001:db8::1"):
        response.answer.append(dns.rrset.from_text("a.test.", 60, "IN", "AAAA", address))
    got = dnsread.read_response(response.to_wire())
    assert [r.data for r in got.records] == ["::ffff:0.0.0.0", "::1.2.3.4", "2001:db8::1"]


def test_extended_rcode_and_empty_question() -> None:
    """The OPT record's upper rcode bits count; a bare FORMERR has no question."""
    query = dns.message.make_query("a.test", "A", use_edns=0)
    response = dns.message.make_response(query)
    response.set_rcode(dns.rcode.BADVERS)
    got = dnsread.read_response(response.to_wire())
    assert got.rcode == dns.rcode.BADVERS
    bare = dnsmsg.formerr(dns.message.make_query("a.test", "A").to_wire())
    assert bare is not None
    assert dnsread.read_response(bare).question is None


@settings(deadline=None)  # no timing: CI runs loaded
@given(st.binary(max_size=300))
def test_response_reader_contract(data: bytes) -> None:
    """Any bytes: a Response or ValueError, never another exception."""
    with contextlib.suppress(ValueError):
        dnsread.read_response(data)


def test_refusal_truncated_and_with_id_are_answers_dnspython_reads() -> None:
    """Bare answers keep the id, RD and the question; with_id swaps only the id."""
    q = dns.message.make_query("Www.A.test", "AAAA", use_edns=0, payload=1232)
    wire = q.to_wire()
    read = dnsread.read_query(wire)
    refused = dns.message.from_wire(dnsread.refusal(wire, read, dns.rcode.REFUSED))
    assert refused.id == q.id and refused.rcode() == dns.rcode.REFUSED
    assert q.is_response(refused) and refused.flags & dns.flags.RD
    cut = dns.message.from_wire(dnsread.truncated(wire, read))
    assert cut.flags & dns.flags.TC and cut.rcode() == dns.rcode.NOERROR and not cut.answer
    other = dnsread.with_id(wire, 0x1234)
    assert dns.message.from_wire(other).id == 0x1234 and other[2:] == wire[2:]


def test_label_escapes_match_dnspython() -> None:
    """Dots, spaces, quotes and high bytes inside a label are escaped as dnspython escapes them."""
    name = dns.name.Name([b"A.b c", b'"x"', b"\xff\x00", b"test", b""])
    wire = dns.message.make_query(name, "A").to_wire()
    assert dnsread.read_query(wire).name == dnsmsg.name_text(name)
    assert dnsread.read_query(wire).name == 'a\\.b\\032c.\\"x\\".\\255\\000.test'


def test_address_records_carry_their_address() -> None:
    """An A record read off the wire has its address at hand (no second parse)."""
    query = dns.message.make_query("a.test", "A")
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text("a.test.", 5, "IN", "A", "192.0.2.9"))
    [record] = dnsread.read_response(response.to_wire()).records
    assert record.address == ipaddress.ip_address("192.0.2.9")


def test_cname_chain_with_names_pointing_back() -> None:
    """Owners compressed to the question and to an earlier CNAME target read as dnspython's."""
    query = dns.message.make_query("www.shop.test", "A")
    response = dns.message.make_response(query)
    response.answer.append(
        dns.rrset.from_text("www.shop.test.", 300, "IN", "CNAME", "cdn.evil.test.")
    )
    response.answer.append(
        dns.rrset.from_text("cdn.evil.test.", 20, "IN", "CNAME", "edge.evil.test.")
    )
    response.answer.append(dns.rrset.from_text("edge.evil.test.", 20, "IN", "A", "192.0.2.7"))
    wire = response.to_wire()
    got = dnsread.read_response(wire).records
    assert list(got) == dnsmsg.answer_records(dns.message.from_wire(wire))
    assert [r.name for r in got] == ["www.shop.test", "cdn.evil.test", "edge.evil.test"]


@pytest.mark.parametrize("sinkhole", [None, "0.0.0.0", "192.0.2.254", "2001:db8::1"])
@pytest.mark.parametrize("qtype", ["A", "AAAA", "MX"])
@pytest.mark.parametrize("edns", [False, True])
def test_blocked_answer_is_dnsmsg_blocked_without_dnspython(
    sinkhole: str | None, qtype: str, edns: bool
) -> None:
    """The same code, records, flags and EDNS presence as dnspython's blocked answer."""
    q = dns.message.make_query("Casino.test", qtype, use_edns=0 if edns else False)
    wire = q.to_wire()
    address = ipaddress.ip_address(sinkhole) if sinkhole is not None else None
    reply, records = dnsread.blocked(wire, dnsread.read_query(wire), address)
    got = dns.message.from_wire(reply)
    want = dnsmsg.blocked(q, address)
    assert q.is_response(got)
    assert got.rcode() == want.rcode() and got.flags == want.flags
    assert dnsmsg.answer_records(got) == dnsmsg.answer_records(want) == records
    assert [r.ip for r in records] == [r.ip for r in dnsmsg.answer_records(want)]
    assert (got.edns >= 0) == edns
