"""DNS messages as the DNS proxy handles them: bytes in, dnspython messages out, and back. Pure.

Rules:

1. ``parse_query(wire)`` returns the query, or raises ``ValueError`` saying why it is not one
   the proxy forwards: not a DNS message, a response, an opcode other than QUERY, not exactly one
   question, a class other than IN, a zone transfer (AXFR/IXFR). ``formerr(wire)`` is the answer
   to such a message when its header can be read (None when not even that: it is dropped).
2. Over UDP an answer is at most ``udp_limit(query)`` bytes: 512 without EDNS (RFC 1035), else
   the size the client advertised (never less than 512). A longer answer is cut at a whole
   record with TC set (``to_udp_wire``), so the client asks again over TCP (RFC 7766).
3. Over TCP every message is preceded by its length in two bytes; ``split_tcp`` takes whole
   messages off a buffer and leaves the rest.
4. A refused name is answered NXDOMAIN, or with the sinkhole address for a question of its
   family (A for IPv4, AAAA for IPv6) and an empty answer for any other type (``blocked``).
5. ``answer_records`` lists the A, AAAA and CNAME records of a response's answer section, in
   order, as plain values (name and targets lowercase without the final dot).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
UDP_DEFAULT_LIMIT = 512  # RFC 1035 section 4.2.1
MAX_MESSAGE = 65535  # a TCP message's length field is two bytes
BLOCKED_TTL = 60  # seconds a sinkhole answer may be cached
_ZONE_TRANSFERS = frozenset({dns.rdatatype.AXFR, dns.rdatatype.IXFR})
_RECORD_TYPES = frozenset({dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.CNAME})


@dataclass(frozen=True, slots=True)
class Record:
    """One answer record as the proxy judges and records it."""

    name: str
    type: str  # "A", "AAAA" or "CNAME"
    ttl: int
    data: str  # the address, or the CNAME target
    # The address as read off the wire, when the reader had it (spares parsing ``data`` again).
    address: IPAddress | None = field(default=None, compare=False, repr=False)

    @property
    def ip(self) -> IPAddress | None:
        """The address of an A or AAAA record, else None."""
        if self.address is not None:
            return self.address
        return ipaddress.ip_address(self.data) if self.type != "CNAME" else None


def name_text(name: dns.name.Name) -> str:
    """A DNS name as policy and feeds see it: lowercase, no final dot (the root is ``.``)."""
    text = name.to_text(omit_final_dot=True).lower()
    return text or "."


def parse_query(wire: bytes) -> dns.message.Message:
    """The query in ``wire``, or ValueError naming why the proxy does not forward it."""
    try:
        msg = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, IndexError) as e:
        raise ValueError(f"not a DNS message: {type(e).__name__}") from e
    if msg.flags & dns.flags.QR:
        raise ValueError("a response, not a query")
    if msg.opcode() != dns.opcode.QUERY:
        raise ValueError(f"opcode {dns.opcode.to_text(msg.opcode())} is not forwarded")
    if len(msg.question) != 1:
        raise ValueError(f"{len(msg.question)} questions (one is supported)")
    q = msg.question[0]
    if q.rdclass != dns.rdataclass.IN:
        raise ValueError(f"class {dns.rdataclass.to_text(q.rdclass)} is not forwarded")
    if q.rdtype in _ZONE_TRANSFERS:
        raise ValueError("zone transfers are not forwarded")
    return msg


def parse_response(wire: bytes, query: dns.message.Message) -> dns.message.Message:
    """The upstream's answer to ``query``, or ValueError (garbage, another id or question)."""
    try:
        msg = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, IndexError) as e:
        raise ValueError(f"upstream sent no DNS message: {type(e).__name__}") from e
    if not query.is_response(msg):
        raise ValueError("upstream answered another query")
    return msg


def formerr(wire: bytes) -> bytes | None:
    """FORMERR for a message whose id and flags are readable and that is not a response."""
    if len(wire) < 12:
        return None
    ident, flags = struct.unpack("!HH", wire[:4])
    if flags & dns.flags.QR:
        return None  # never answer an answer (reflection loops)
    # id, QR set with the opcode kept, RCODE 1 (FORMERR), no records.
    return struct.pack("!HHHHHH", ident, 0x8000 | (flags & 0x7800) | 1, 0, 0, 0, 0)


def question(query: dns.message.Message) -> tuple[str, str]:
    """The question's name (``name_text``) and type (``A``, ``AAAA``...)."""
    q = query.question[0]
    return name_text(q.name), dns.rdatatype.to_text(q.rdtype)


def udp_limit(query: dns.message.Message) -> int:
    """The longest answer the client takes over UDP."""
    if query.edns < 0:
        return UDP_DEFAULT_LIMIT
    return max(UDP_DEFAULT_LIMIT, min(query.payload, MAX_MESSAGE))


def to_udp_wire(response: dns.message.Message, limit: int) -> bytes:
    """``response`` in at most ``limit`` bytes: whole, or cut at a record with TC set."""
    return response.to_wire(max_size=limit, prefer_truncation=True)


def fits_udp(wire: bytes, limit: int) -> bool:
    """True when an answer's bytes may go to the client over UDP as they are."""
    return len(wire) <= limit


def split_tcp(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Whole length-prefixed messages at the start of ``buffer``, and the bytes after them."""
    out: list[bytes] = []
    pos = 0
    while len(buffer) - pos >= 2:
        (size,) = struct.unpack_from("!H", buffer, pos)
        if len(buffer) - pos - 2 < size:
            break
        out.append(buffer[pos + 2 : pos + 2 + size])
        pos += 2 + size
    return out, buffer[pos:]


def to_tcp_wire(wire: bytes) -> bytes:
    """A message with its two-byte length in front."""
    return struct.pack("!H", len(wire)) + wire


def refusal(query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
    """An empty answer with ``rcode`` (REFUSED when busy, SERVFAIL when no upstream answered)."""
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    return response


def blocked(query: dns.message.Message, sinkhole: IPAddress | None) -> dns.message.Message:
    """The answer to a refused name: NXDOMAIN, or the sinkhole address (rule 4)."""
    response = dns.message.make_response(query)
    if sinkhole is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response
    q = query.question[0]
    family = dns.rdatatype.A if sinkhole.version == 4 else dns.rdatatype.AAAA
    if q.rdtype == family:
        rrset = dns.rrset.from_text(q.name, BLOCKED_TTL, "IN", family, str(sinkhole))
        response.answer.append(rrset)
    return response


def answer_records(response: dns.message.Message) -> list[Record]:
    """The A, AAAA and CNAME records of the answer section, in order."""
    out: list[Record] = []
    for rrset in response.answer:
        if rrset.rdtype not in _RECORD_TYPES or rrset.rdclass != dns.rdataclass.IN:
            continue
        kind = dns.rdatatype.to_text(rrset.rdtype)
        name = name_text(rrset.name)
        for rdata in rrset:
            data = name_text(rdata.target) if kind == "CNAME" else rdata.address
            out.append(Record(name, kind, rrset.ttl, data))
    return out


def rcode_text(response: dns.message.Message) -> str:
    """The response code as ECS spells it: ``NOERROR``, ``NXDOMAIN``..."""
    return dns.rcode.to_text(response.rcode())
