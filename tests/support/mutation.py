"""Seeded mutation of valid HTTP traffic: client scenarios for a proxy, upstream answers to them.

Pure: a `random.Random` (or a tag string) in, scripts of steps out; no sockets. A
client scenario (`client_case`) is the bytes of one connection to the proxy:
pipelined absolute-form requests or a CONNECT with tunnel payload, mutated
(framing headers, Connection-named headers, odd line endings, byte flips),
split at random byte boundaries with pauses, and ended by reading, half-closing,
closing or resetting. Every request path carries a tag, `/x/<tag>`; the scripted
upstream derives its answer from the tag alone (`response_script`,
`tunnel_script`), so both sides of a case follow from the seed and a failure
can be replayed from its case id.
"""

from __future__ import annotations

import contextlib
import functools
import random
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

TAG_PATTERN = re.compile(rb"/x/([0-9a-z-]{1,40})")
TAG_HEADER = "X-Fuzz-Tag"
MAX_SPLITS = 8
MAX_PAUSE = 0.02
BYTE_MUTATION_RATE = 0.15
HUGE_HEADER = 40 * 1024
MANY_HEADERS = 150
BIG_BODY = 512 * 1024
INTERESTING_BYTES = (b"\r", b"\n", b"\x00", b" ", b":", b"\xff", b"0", b";", b"\t", b",")


@dataclass(frozen=True)
class Send:
    """Write these bytes."""

    data: bytes


@dataclass(frozen=True)
class Pause:
    """Wait this long before the next step."""

    seconds: float


@dataclass(frozen=True)
class HalfClose:
    """Shut down the writing side (send a FIN) and keep reading."""


@dataclass(frozen=True)
class Close:
    """Close the connection (a FIN, or an RST if unread bytes are pending)."""


@dataclass(frozen=True)
class Reset:
    """Abort the connection with an RST (SO_LINGER 0)."""


@dataclass(frozen=True)
class Hang:
    """Send nothing more and keep the connection open (the peer's timeouts must end it)."""


Step = Send | Pause | HalfClose | Close | Reset | Hang


@dataclass(frozen=True)
class Targets:
    """Where a case may aim: the allowed upstream's ports and names of the test bed."""

    http_port: int  # the upstream port policy allows for absolute-form requests
    tunnel_port: int  # the upstream port policy allows for CONNECT tunnels
    allowed_names: Sequence[str]  # names and literals that policy allows
    refused_names: Sequence[str]  # names policy, feeds or the resolver refuse


@dataclass
class ClientCase:
    """One client connection: its steps and what it asked for."""

    case_id: int
    kind: str  # "http" or "connect"
    steps: list[Step]
    tags: list[str]  # the tags of the requests it sends (in order)
    head_request: bool = False  # a single HEAD request: responses from upstream have no body
    notes: list[str] = field(default_factory=list)  # the mutations applied, for failure reports

    def describe(self) -> str:
        """Return the case as text: kind, mutations and the bytes it sends."""
        sent = b"".join(s.data for s in self.steps if isinstance(s, Send))
        ends = [type(s).__name__ for s in self.steps if not isinstance(s, Send | Pause)]
        return f"case {self.case_id} ({self.kind}; {', '.join(self.notes)}; ends {ends}): {sent!r}"


# ---- client side ------------------------------------------------------------------------------


def _tag(rng: random.Random, case_id: int, index: int) -> str:
    return f"{case_id}-{index}-{rng.getrandbits(24):06x}"


def _chunked(rng: random.Random, body: bytes, notes: list[str]) -> bytes:
    out, pos = [], 0
    while pos < len(body):
        n = rng.randint(1, max(1, len(body) - pos))
        ext = b";ext=1" if rng.random() < 0.2 else b""
        out.append(b"%x%s\r\n%s\r\n" % (n, ext, body[pos : pos + n]))
        pos += n
    roll = rng.random()
    if roll < 0.1:
        notes.append("trailer")
        return b"".join(out) + b"0\r\nX-Trailer: t\r\n\r\n"
    if roll < 0.15:
        notes.append("bad chunk size")
        return b"".join(out) + b"zz\r\n\r\n"
    if roll < 0.2:
        notes.append("huge chunk size")
        return b"".join(out) + b"fffffffffffffffffff\r\n"
    return b"".join(out) + b"0\r\n\r\n"


def _framing(rng: random.Random, body: bytes, notes: list[str]) -> tuple[list[str], bytes]:
    """Return (header lines, body bytes) for one framing of `body`, valid or hostile."""
    choice = rng.choice(
        [
            "length",
            "length",
            "chunked",
            "chunked",
            "length+chunked",
            "gzip,chunked",
            "chunked,gzip",
            "connection-names-te",
            "connection-names-cl",
            "duplicate-length",
            "conflicting-length",
            "negative-length",
            "chunked-space",
        ]
    )
    notes.append(f"framing {choice}")
    cl = f"Content-Length: {len(body)}"
    if choice == "length":
        return [cl], body
    if choice == "chunked":
        return ["Transfer-Encoding: chunked"], _chunked(rng, body, notes)
    if choice == "length+chunked":
        chunked = _chunked(rng, body, notes)
        return [f"Content-Length: {len(chunked)}", "Transfer-Encoding: chunked"], chunked
    if choice == "gzip,chunked":
        return ["Transfer-Encoding: gzip, chunked"], _chunked(rng, body, notes)
    if choice == "chunked,gzip":
        return ["Transfer-Encoding: chunked, gzip", cl], body
    if choice == "connection-names-te":
        # A Connection header naming a framing header: a proxy that drops what Connection
        # names drops the framing it used itself, and the upstream frames the body otherwise.
        return ["Transfer-Encoding: chunked", "Connection: Transfer-Encoding"], _chunked(
            rng, body, notes
        )
    if choice == "connection-names-cl":
        return [cl, "Connection: keep-alive, Content-Length"], body
    if choice == "duplicate-length":
        return [cl, cl], body
    if choice == "conflicting-length":
        return [cl, f"Content-Length: {len(body) + 3}"], body
    if choice == "negative-length":
        return ["Content-Length: -1"], body
    return ["Transfer-Encoding : chunked"], _chunked(rng, body, notes)


def _extra_headers(rng: random.Random, notes: list[str]) -> list[str]:
    pool = [
        "User-Agent: fuzz/1",
        "Accept: */*",
        "Connection: keep-alive",
        "Proxy-Connection: keep-alive",
        "TE: trailers",
        "Via: 1.0 elsewhere",
        "X-Empty:",
        "X-Dup: 1",
        "X-Dup: 2",
        "Cookie: " + "c" * rng.randint(1, 2000),
        "X-Utf8: caf\u00e9",
        "Connection: close",
        "Expect: 100-continue",
        "Keep-Alive: timeout=5",
        "Connection: X-Hop",
        "X-Hop: secret",
        "X-Folded: a\r\n folded",
        "X-Tab:\tvalue",
    ]
    chosen = rng.sample(pool, rng.randint(0, 4))
    roll = rng.random()
    if roll < 0.04:
        chosen.append("X-Huge: " + "h" * HUGE_HEADER)
        notes.append("huge header")
    elif roll < 0.08:
        chosen += [f"X-Many-{i}: {i}" for i in range(MANY_HEADERS)]
        notes.append("many headers")
    elif roll < 0.12:
        chosen += ["Upgrade: websocket", "Connection: Upgrade"]
        notes.append("upgrade")
    return chosen


def _request(
    rng: random.Random,
    targets: Targets,
    tag: str,
    notes: list[str],
    *,
    method: str,
    allow_refused: bool,
) -> bytes:
    names = list(targets.allowed_names)
    if allow_refused and rng.random() < 0.25:
        names = list(targets.refused_names)
    host = rng.choice(names)
    port = targets.http_port if rng.random() < 0.92 else targets.tunnel_port
    authority = f"{host}:{port}"
    query = "" if rng.random() < 0.7 else f"?q={rng.getrandbits(16)}&a=%41"
    target = f"http://{authority}/x/{tag}{query}"
    version = "HTTP/1.1" if rng.random() < 0.9 else rng.choice(["HTTP/1.0", "HTTP/1.2"])
    lines = [f"{method} {target} {version}"]
    host_header = rng.random()
    if host_header < 0.8:
        lines.append(f"Host: {authority}")
    elif host_header < 0.9:
        lines.append("Host: other.test")
        notes.append("other Host")
    lines += _extra_headers(rng, notes)
    body = b""
    if method in ("POST", "PUT", "PATCH") or rng.random() < 0.05:
        body = bytes(rng.choice(b"abcdefgh") for _ in range(rng.randint(0, 3000)))
        if rng.random() < 0.4:
            # A whole request as the body: if the proxy frames the body otherwise than the
            # client did, the upstream sees it as a second request nobody decided.
            body = f"GET /x/{tag}-smuggled HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
            notes.append("request as body")
        framing, body = _framing(rng, body, notes)
        lines += framing
    head = lines[:1] + rng.sample(lines[1:], len(lines) - 1)  # header order is free
    eol = "\r\n" if rng.random() < 0.93 else "\n"
    if eol == "\n":
        notes.append("LF line ends")
    return (eol.join(head) + eol + eol).encode("utf-8") + body


def _mutate_bytes(rng: random.Random, data: bytes, notes: list[str]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        if not buf:
            break
        pos = rng.randrange(len(buf))
        op = rng.choice(["flip", "insert", "delete", "duplicate"])
        if op == "flip":
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == "insert":
            buf[pos:pos] = rng.choice(INTERESTING_BYTES)
        elif op == "delete":
            del buf[pos]
        else:
            end = min(len(buf), pos + rng.randint(1, 64))
            buf[pos:pos] = buf[pos:end]
        notes.append(f"{op}@{pos}")
    return bytes(buf)


def _split(rng: random.Random, data: bytes) -> list[Step]:
    """Cut `data` at random byte offsets into sends with short pauses between them."""
    if not data:
        return []
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, MAX_SPLITS))))
    steps: list[Step] = []
    start = 0
    for cut in [*cuts, len(data)]:
        steps.append(Send(data[start:cut]))
        if cut < len(data) and rng.random() < 0.5:
            steps.append(Pause(rng.uniform(0, MAX_PAUSE)))
        start = cut
    return steps


def _ending(rng: random.Random, data: bytes, notes: list[str]) -> list[Step]:
    """Split `data` into sends and end the connection one of four ways."""
    roll = rng.random()
    if roll < 0.6:
        return _split(rng, data)
    if roll < 0.75:
        notes.append("half-close")
        return [*_split(rng, data), HalfClose()]
    cut = rng.randint(0, len(data))
    if roll < 0.88:
        notes.append(f"close after {cut} bytes")
        return [*_split(rng, data[:cut]), Pause(rng.uniform(0, MAX_PAUSE)), Close()]
    notes.append(f"reset after {cut} bytes")
    return [*_split(rng, data[:cut]), Pause(rng.uniform(0, MAX_PAUSE)), Reset()]


def _http_case(rng: random.Random, case_id: int, targets: Targets) -> ClientCase:
    notes: list[str] = []
    count = rng.choice([1, 1, 1, 2, 2, 3, 5])
    methods = ["GET", "GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]
    head_request = count == 1 and rng.random() < 0.1
    tags = [_tag(rng, case_id, i) for i in range(count)]
    data = b"".join(
        _request(
            rng,
            targets,
            tag,
            notes,
            method="HEAD" if head_request else rng.choice(methods),
            allow_refused=True,
        )
        for tag in tags
    )
    if count > 1:
        notes.append(f"{count} pipelined")
    if rng.random() < BYTE_MUTATION_RATE:
        data = _mutate_bytes(rng, data, notes)
    return ClientCase(case_id, "http", _ending(rng, data, notes), tags, head_request, notes)


@functools.cache
def client_hello(server_name: str) -> bytes:
    """Return the ClientHello Python's TLS client sends to `server_name`."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _connect_case(rng: random.Random, case_id: int, targets: Targets) -> ClientCase:
    notes: list[str] = []
    tag = _tag(rng, case_id, 0)
    roll = rng.random()
    if roll < 0.7:
        authority = f"{rng.choice(targets.allowed_names)}:{targets.tunnel_port}"
    elif roll < 0.8:
        authority = f"{rng.choice(targets.refused_names)}:{targets.tunnel_port}"
    elif roll < 0.85:
        authority = f"{targets.allowed_names[0]}:{targets.http_port}"
    else:
        authority = rng.choice(
            [
                targets.allowed_names[0],
                f"{targets.allowed_names[0]}:99999",
                f":{targets.tunnel_port}",
                f"{targets.allowed_names[0]}:{targets.tunnel_port}/path",
                f"[::ffff:127.0.0.71]:{targets.tunnel_port}",
            ]
        )
    notes.append(f"CONNECT {authority}")
    head_lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    head_lines += rng.sample(["Proxy-Connection: keep-alive", "User-Agent: fuzz/1"], 1)
    if rng.random() < 0.1:
        head_lines.append("Content-Length: 5")
        notes.append("CONNECT with a body length")
    head = ("\r\n".join(head_lines) + "\r\n\r\n").encode()
    payload_kind = rng.choice(["tls", "tls-other-sni", "tls-truncated", "plain", "plain", "none"])
    notes.append(f"payload {payload_kind}")
    if payload_kind == "tls":
        payload = client_hello(targets.allowed_names[0]) + f"/x/{tag} ".encode()
    elif payload_kind == "tls-other-sni":
        payload = client_hello(targets.refused_names[0])
    elif payload_kind == "tls-truncated":
        hello = client_hello(targets.allowed_names[0])
        payload = hello[: rng.randint(1, len(hello) - 1)]
    elif payload_kind == "plain":
        payload = f"GET /x/{tag} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    else:
        payload = b""
    data = head + payload
    if rng.random() < BYTE_MUTATION_RATE:
        data = _mutate_bytes(rng, data, notes)
    return ClientCase(case_id, "connect", _ending(rng, data, notes), [tag], False, notes)


def client_case(rng: random.Random, case_id: int, targets: Targets) -> ClientCase:
    """Return one mutated client scenario (absolute-form requests or a CONNECT tunnel)."""
    if rng.random() < 0.7:
        return _http_case(rng, case_id, targets)
    return _connect_case(rng, case_id, targets)


# ---- upstream side ------------------------------------------------------------------------------


def find_tag(data: bytes) -> str | None:
    """Return the first `/x/<tag>` tag in `data`, or None."""
    match = TAG_PATTERN.search(data)
    return match.group(1).decode() if match else None


def _head(status: str, headers: Sequence[str]) -> bytes:
    return ("\r\n".join([f"HTTP/1.1 {status}", *headers]) + "\r\n\r\n").encode()


RESPONSE_KINDS = (
    "ok",
    "ok",
    "ok",
    "chunked",
    "chunked-trailer",
    "close-delimited",
    "no-content-with-body",
    "interim",
    "continue",
    "switching",
    "extra-response",
    "short-body",
    "long-body",
    "huge-head",
    "many-headers",
    "unterminated-head",
    "unterminated-head-hang",
    "bad-status",
    "nul-in-head",
    "folded-header",
    "te-gzip",
    "te-gzip-chunked",
    "te-chunked-gzip",
    "conflicting-length",
    "length-and-chunked",
    "close-at-once",
    "reset-at-once",
    "close-mid-head",
    "reset-mid-body",
    "hang",
    "big-body",
    "connection-close",
    "connection-names-length",
    "hop-headers",
)


def _response_start(tag: str) -> tuple[random.Random, bytes, str]:
    rng = random.Random(tag)
    body = bytes(rng.choice(b"0123456789") for _ in range(rng.randint(0, 4000)))
    return rng, body, rng.choice(RESPONSE_KINDS)


def response_kind(tag: str) -> str:
    """Return which kind of answer `response_script(tag)` is (for failure reports)."""
    return _response_start(tag)[2]


def response_script(tag: str) -> list[Step]:
    """Return the upstream's answer to the request tagged `tag`: valid, or mutated."""
    rng, body, kind = _response_start(tag)
    marker = f"{TAG_HEADER}: {tag}"
    cl = f"Content-Length: {len(body)}"
    ok = _head("200 OK", [marker, cl, "Content-Type: text/plain"]) + body
    if kind == "ok":
        data = ok
    elif kind in ("chunked", "chunked-trailer"):
        chunks = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 700]), body[i : i + 700])
            for i in range(0, len(body), 700)
        )
        trailer = b"X-Trailer: t\r\n" if kind == "chunked-trailer" else b""
        data = (
            _head("200 OK", [marker, "Transfer-Encoding: chunked"]) + chunks + b"0\r\n" + trailer
        ) + b"\r\n"
    elif kind == "close-delimited":
        return [Send(_head("200 OK", [marker]) + body), Close()]
    elif kind == "no-content-with-body":
        data = _head("204 No Content", [marker, "Content-Length: 5"]) + b"hello"
    elif kind == "interim":
        data = (
            _head("102 Processing", [])
            + _head("103 Early Hints", ["Link: </s.css>; rel=preload"])
            + ok
        )
    elif kind == "continue":
        data = _head("100 Continue", []) + _head("100 Continue", []) + ok
    elif kind == "switching":
        data = _head("101 Switching Protocols", ["Upgrade: websocket", "Connection: Upgrade"])
        data += b"\x81\x05hello"
    elif kind == "extra-response":
        data = ok + ok  # in one write: nothing was asked for the second
    elif kind == "short-body":
        return [
            Send(_head("200 OK", [marker, f"Content-Length: {len(body) + 100}"]) + body),
            Close(),
        ]
    elif kind == "long-body":
        data = _head("200 OK", [marker, "Content-Length: 3"]) + body + b"trailing junk"
    elif kind == "huge-head":
        data = _head("200 OK", [marker, "X-Huge: " + "h" * HUGE_HEADER, cl]) + body
    elif kind == "many-headers":
        data = _head("200 OK", [marker, cl, *[f"X-M-{i}: {i}" for i in range(MANY_HEADERS)]]) + body
    elif kind == "unterminated-head":
        return [Send(_head("200 OK", [marker, cl])[:-2]), Close()]
    elif kind == "unterminated-head-hang":
        return [Send(b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"s" * 100), Hang()]
    elif kind == "bad-status":
        data = rng.choice([b"HTTP/1.1 abc OK\r\n\r\n", b"ICY 200 OK\r\n\r\n", b"\r\n\r\n"]) + body
    elif kind == "nul-in-head":
        data = b"HTTP/1.1 200 OK\r\nX-Nul: a\x00b\r\n" + cl.encode() + b"\r\n\r\n" + body
    elif kind == "folded-header":
        data = _head("200 OK", [marker, "X-Fold: a", " continued", cl]) + body
    elif kind == "te-gzip":
        return [Send(_head("200 OK", [marker, "Transfer-Encoding: gzip"]) + body), Close()]
    elif kind == "te-gzip-chunked":
        data = _head("200 OK", [marker, "Transfer-Encoding: gzip, chunked"])
        data += b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    elif kind == "te-chunked-gzip":
        return [Send(_head("200 OK", [marker, "Transfer-Encoding: chunked, gzip"]) + body), Close()]
    elif kind == "conflicting-length":
        data = _head("200 OK", [marker, cl, f"Content-Length: {len(body) + 1}"]) + body
    elif kind == "length-and-chunked":
        data = _head("200 OK", [marker, cl, "Transfer-Encoding: chunked"]) + body
    elif kind == "close-at-once":
        return [Close()]
    elif kind == "reset-at-once":
        return [Reset()]
    elif kind == "close-mid-head":
        return [Send(ok[: rng.randint(1, 30)]), Close()]
    elif kind == "reset-mid-body":
        return [Send(ok[: len(ok) - len(body) // 2 - 1]), Reset()]
    elif kind == "hang":
        return [Hang()]
    elif kind == "big-body":
        big = b"b" * BIG_BODY
        data = _head("200 OK", [marker, f"Content-Length: {len(big)}"]) + big
    elif kind == "connection-close":
        return [Send(_head("200 OK", [marker, cl, "Connection: close"]) + body), Close()]
    elif kind == "connection-names-length":
        # Connection names the Content-Length that frames this very response.
        data = _head("200 OK", [marker, cl, "Connection: Content-Length"]) + body
    else:
        data = _head("200 OK", [marker, cl, "Connection: X-Up", "X-Up: s", "Keep-Alive: 1"]) + body
    return [*_split(rng, data)] if rng.random() < 0.3 else [Send(data)]


def tunnel_script(tag: str | None) -> list[Step]:
    """Return what the upstream does inside a tunnel whose first bytes carried `tag`."""
    if tag is None:
        return [Send(b"tunnel hello\n")]
    rng = random.Random(tag)
    kind = rng.choice(["echo", "echo", "send-close", "close", "reset", "half-close", "big"])
    if kind == "echo":
        return [Send(b"echo " + tag.encode() + b"\n")]
    if kind == "send-close":
        return [Send(b"bye\n"), Close()]
    if kind == "close":
        return [Close()]
    if kind == "reset":
        return [Reset()]
    if kind == "half-close":
        return [Send(b"half\n"), HalfClose()]
    return [Send(b"t" * BIG_BODY)]
