"""The few fields of a DNS message the proxy's fast path needs, read straight off the bytes. Pure.

dnspython builds every name, rdata and section of a message as objects (hundreds of µs a
message under load); the proxy needs only the header, the question, the client's EDNS size,
and the A, AAAA and CNAME records of an answer. Everything else is skipped by its length.
dnspython stays where a message must be built (blocked answers, truncation).

Rules:

1. ``read_query(wire)`` returns the ``Query`` or raises ``ValueError`` for the same messages as
   ``dnsmsg.parse_query``: not a DNS message (cut short, bad label, compression pointer not
   strictly backwards, name longer than 255 bytes, bytes after the last record), a response,
   an opcode other than QUERY, not exactly one question, a class other than IN, a zone
   transfer.
2. ``read_response(wire, records=...)`` returns the ``Response``: id, flags, the response code
   (its upper bits from the OPT record when there is one), the question (None when there is
   none) and, with ``records``, the answer section's A, AAAA and CNAME records of class IN in
   order (as ``dnsmsg.answer_records``). ``ValueError`` when the bytes are not a DNS message.
3. Names read as ``dnsmsg.name_text`` writes them: lowercase, no final dot, the root as ``.``,
   special and non-printable bytes escaped as dnspython escapes them.
4. ``with_id(wire, ident)`` is the message with another id; ``refusal(wire, query, rcode)`` an
   answer carrying the query's question and nothing else; ``truncated(wire, query)`` the same
   with TC set and no error; ``blocked(wire, query, sinkhole)`` the answer to a refused name
   (``dnsmsg`` rule 4: NXDOMAIN, or the sinkhole address for a question of its family). Each
   carries an OPT record (``OUR_PAYLOAD``, no options) when the query had one (RFC 6891).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

import dns.ipv6

from egressgw.wire.dnsmsg import BLOCKED_TTL, MAX_MESSAGE, UDP_DEFAULT_LIMIT, IPAddress, Record

HEADER = 12
QR = 0x8000
TC = 0x0200
RD = 0x0100
OPCODE_MASK = 0x7800
TYPE_A, TYPE_CNAME, TYPE_AAAA, TYPE_OPT = 1, 5, 28, 41
TYPE_AXFR, TYPE_IXFR = 252, 251
CLASS_IN = 1
RCODE_NXDOMAIN = 3
OUR_PAYLOAD = 1232  # the UDP size the proxy's own answers advertise (DNS flag day 2020)
MAX_NAME = 255  # bytes of a name on the wire (RFC 1035 section 3.1)
_ESCAPED = b'"().;\\@$'  # what dnspython writes as \c
# Label bytes written as they are: printable ASCII but the escaped ones (uppercase is lowered).
_PLAIN = bytes(c for c in range(0x21, 0x7F) if c not in _ESCAPED)
_HEAD = struct.Struct("!HHHHHH")
_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdata length


@dataclass(frozen=True, slots=True)
class Query:
    """What the proxy reads of a client's query."""

    id: int
    flags: int
    name: str
    qtype: int
    question_end: int  # offset of the first byte after the question
    udp_limit: int  # the longest answer the client takes over UDP
    edns: bool  # the query has an OPT record (so the proxy's own answers carry one)


@dataclass(frozen=True, slots=True)
class Response:
    """What the proxy reads of an upstream's answer."""

    id: int
    flags: int
    rcode: int
    question: tuple[str, int, int] | None  # name, type, class
    records: tuple[Record, ...]


def _label_text(label: bytes) -> str:
    if not label.translate(None, _PLAIN):
        return label.decode("ascii").lower()
    out = []
    for c in label.lower():
        if c in _ESCAPED:
            out.append("\\" + chr(c))
        elif 0x20 < c < 0x7F:
            out.append(chr(c))
        else:
            out.append(f"\\{c:03d}")
    return "".join(out)


def read_name(wire: bytes, offset: int) -> tuple[str, int]:
    """The name at ``offset`` (``dnsmsg.name_text``) and the offset after it in place."""
    labels: list[str] = []
    size = 1  # the root's length byte
    end = -1  # where the name ends in place: after its first pointer, or its root byte
    pos = offset
    lowest = offset  # pointers must go strictly backwards (no loops), as dnspython's do
    while True:
        if pos >= len(wire):
            raise ValueError("name runs past the message")
        length = wire[pos]
        if length == 0:
            if end < 0:
                end = pos + 1
            break
        if length >= 0xC0:
            if pos + 1 >= len(wire):
                raise ValueError("name runs past the message")
            target = (length & 0x3F) << 8 | wire[pos + 1]
            if target >= lowest:
                raise ValueError("compression pointer does not point backwards")
            if end < 0:
                end = pos + 2
            lowest = pos = target
            continue
        if length > 63:
            raise ValueError("unknown label type")
        size += length + 1
        if size > MAX_NAME:
            raise ValueError("name longer than 255 bytes")
        if pos + 1 + length > len(wire):
            raise ValueError("name runs past the message")
        labels.append(_label_text(wire[pos + 1 : pos + 1 + length]))
        pos += 1 + length
    return (".".join(labels) if labels else "."), end


def _name_at(wire: bytes, pos: int, known: dict[int, str]) -> tuple[str, int]:
    """``read_name``, but a pointer straight to a name read before costs a dict look-up."""
    if pos + 1 < len(wire) and wire[pos] >= 0xC0:
        name = known.get((wire[pos] & 0x3F) << 8 | wire[pos + 1])
        if name:
            return name, pos + 2
    return read_name(wire, pos)


def _skip_name(wire: bytes, offset: int) -> int:
    return read_name(wire, offset)[1]


def _fixed(wire: bytes, pos: int) -> tuple[int, int, int, int, int]:
    """(type, class, ttl, rdata length, rdata offset) of the record whose fixed part is at pos."""
    if pos + 10 > len(wire):
        raise ValueError("record runs past the message")
    rtype, rclass, ttl, rdlen = _FIXED.unpack_from(wire, pos)
    start = pos + 10
    if start + rdlen > len(wire):
        raise ValueError("record data runs past the message")
    return rtype, rclass, ttl, rdlen, start


def _header(wire: bytes) -> tuple[int, int, int, int, int, int]:
    if len(wire) < HEADER:
        raise ValueError("not a DNS message: shorter than its header")
    ident, flags, qd, an, ns, ar = _HEAD.unpack_from(wire)
    return ident, flags, qd, an, ns, ar


def _opt(wire: bytes, pos: int, count: int) -> tuple[int, tuple[int, int] | None]:
    """Skip ``count`` records from ``pos``: the offset after them and the OPT's (size, ttl)."""
    found: tuple[int, int] | None = None
    for _ in range(count):
        pos = _skip_name(wire, pos)
        rtype, rclass, ttl, rdlen, start = _fixed(wire, pos)
        if rtype == TYPE_OPT:
            found = (rclass, ttl)  # the OPT's class is the sender's UDP size
        pos = start + rdlen
    return pos, found


def read_query(wire: bytes) -> Query:
    """The query in ``wire``, or ValueError naming why the proxy does not forward it (rule 1)."""
    ident, flags, qd, an, ns, ar = _header(wire)
    if flags & QR:
        raise ValueError("a response, not a query")
    if flags & OPCODE_MASK:
        raise ValueError(f"opcode {(flags & OPCODE_MASK) >> 11} is not forwarded")
    if qd != 1:
        raise ValueError(f"{qd} questions (one is supported)")
    name, pos = read_name(wire, HEADER)
    if pos + 4 > len(wire):
        raise ValueError("question runs past the message")
    qtype, qclass = struct.unpack_from("!HH", wire, pos)
    question_end = pos + 4
    end, opt = _opt(wire, question_end, an + ns + ar)
    if end != len(wire):
        raise ValueError("bytes after the last record")
    if qclass != CLASS_IN:
        raise ValueError(f"class {qclass} is not forwarded")
    if qtype in (TYPE_AXFR, TYPE_IXFR):
        raise ValueError("zone transfers are not forwarded")
    limit = UDP_DEFAULT_LIMIT if opt is None else max(UDP_DEFAULT_LIMIT, min(opt[0], MAX_MESSAGE))
    return Query(ident, flags, name, qtype, question_end, limit, opt is not None)


def read_response(wire: bytes, records: bool = True) -> Response:
    """The answer in ``wire`` (rule 2); without ``records`` the header and question only."""
    ident, flags, qd, an, ns, ar = _header(wire)
    pos = HEADER
    question: tuple[str, int, int] | None = None
    known: dict[int, str] = {}  # names read so far by offset: answers point back at them
    for _ in range(qd):
        name, pos = read_name(wire, pos)
        if pos + 4 > len(wire):
            raise ValueError("question runs past the message")
        qtype, qclass = struct.unpack_from("!HH", wire, pos)
        pos += 4
        if question is None:
            question = (name, qtype, qclass)
            known[HEADER] = name
    rcode = flags & 0x000F
    if not records:
        return Response(ident, flags, rcode, question, ())
    found: list[Record] = []
    for _ in range(an):
        owner, pos = _name_at(wire, pos, known)
        rtype, rclass, ttl, rdlen, start = _fixed(wire, pos)
        pos = start + rdlen
        if rclass != CLASS_IN:
            continue
        if rtype == TYPE_A and rdlen == 4:
            ip4 = ipaddress.IPv4Address(wire[start:pos])
            found.append(Record(owner, "A", ttl, str(ip4), ip4))
        elif rtype == TYPE_AAAA and rdlen == 16:
            packed = wire[start:pos]
            ip6 = ipaddress.IPv6Address(packed)
            # dnspython's text (RFC 5952: ``::ffff:0.0.0.0``, not Python 3.11's ``::ffff:0:0``),
            # so an event says what a dnspython-read answer would.
            found.append(Record(owner, "AAAA", ttl, dns.ipv6.inet_ntoa(packed), ip6))
        elif rtype == TYPE_CNAME:
            target, after = read_name(wire, start)
            if after != pos:
                raise ValueError("CNAME data is not one name")
            known[start] = target
            found.append(Record(owner, "CNAME", ttl, target))
        elif rtype in (TYPE_A, TYPE_AAAA):
            raise ValueError("address record of the wrong length")
    end, opt = _opt(wire, pos, ns + ar)
    if end != len(wire):
        raise ValueError("bytes after the last record")
    if opt is not None:
        rcode |= (opt[1] >> 24) << 4  # the extended response code's upper 8 bits
    return Response(ident, flags, rcode, question, tuple(found))


def with_id(wire: bytes, ident: int) -> bytes:
    """``wire`` with its id replaced."""
    return ident.to_bytes(2, "big") + wire[2:]


def refusal(wire: bytes, query: Query, rcode: int) -> bytes:
    """An answer to ``query`` (``wire``) with ``rcode``, its question and no records."""
    return _bare(wire, query, rcode)


def truncated(wire: bytes, query: Query) -> bytes:
    """An empty answer to ``query`` with TC set: the client asks again over TCP."""
    return _bare(wire, query, TC)


def blocked(wire: bytes, query: Query, sinkhole: IPAddress | None) -> tuple[bytes, list[Record]]:
    """The answer to a refused name and its answer records (rule 4)."""
    if sinkhole is None:
        return _bare(wire, query, RCODE_NXDOMAIN), []
    kind, rtype = ("A", TYPE_A) if sinkhole.version == 4 else ("AAAA", TYPE_AAAA)
    if query.qtype != rtype:
        return _bare(wire, query, 0), []
    data = sinkhole.packed
    # The owner is a pointer to the question's name (offset 12).
    rr = b"\xc0\x0c" + _FIXED.pack(rtype, CLASS_IN, BLOCKED_TTL, len(data)) + data
    record = Record(query.name, kind, BLOCKED_TTL, str(sinkhole), sinkhole)
    return _bare(wire, query, 0, rr), [record]


def _bare(wire: bytes, query: Query, bits: int, answer: bytes = b"") -> bytes:
    flags = QR | (query.flags & (OPCODE_MASK | RD)) | bits
    head = _HEAD.pack(query.id, flags, 1, 1 if answer else 0, 0, 1 if query.edns else 0)
    opt = _OPT if query.edns else b""
    return head + wire[HEADER : query.question_end] + answer + opt


# The root name, type OPT, class = our UDP size, TTL 0 (rcode bits, version 0, no DO), no data.
_OPT = b"\x00" + _FIXED.pack(TYPE_OPT, OUR_PAYLOAD, 0, 0)
