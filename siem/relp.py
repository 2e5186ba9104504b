"""RELP (Reliable Event Logging Protocol, rsyslog's librelp) client core, without I/O.

The sink (`siem.sinks.relp`) owns the socket; this module turns commands into bytes and
received bytes into events, so it is tested with plain calls (`tests/siem/test_relp.py`).

Wire format (librelp `doc/relp.md`, checked against librelp 1.11 and rsyslog's imrelp)::

    FRAME   = TXNR SP COMMAND SP DATALEN [SP DATA] LF
    TXNR    = 1*9DIGIT    0 for hints (serverclose); commands count 1, 2, ... per session
    COMMAND = 1*32ALPHA   open, syslog, close, rsp, serverclose
    DATALEN = 1*9DIGIT    octets in DATA; with 0, DATA and its SP are absent

A session opens with `open` (txnr 1) carrying offers, one ``name=value,value`` per line
(``relp_version=1``, ``commands=syslog``); the server answers ``rsp`` with ``200 OK``, LF and
the offers it accepts. Every ``syslog`` command is answered by an ``rsp`` with the same txnr:
``200 OK`` means the receiver has taken the message. ``close`` is answered by an ``rsp``
(librelp sends it with no data at all), and a server that ends a session first sends the
hint ``0 serverclose 0``.

What real librelp servers do that the specification does not say:

* librelp 1.11 answers ``relp_version=0`` to an offer of 1 (its engine speaks version 0), so
  any version up to ours is accepted.
* The server insists on consecutive txnrs and, after 999,999,999, expects 1,000,000,000,
  which its own parser then rejects (ten digits). The specification wraps to 1, and so does
  `next_txnr`; since neither value works with librelp, a session reports `exhausted` before
  it would wrap and the sink opens a new session (txnr 1 again) instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

MAX_TXNR = 999_999_999
MAX_DATALEN = 999_999_999
MAX_COMMAND_LEN = 32
# librelp's RELP_DFLT_MAX_DATA_SIZE: the largest frame a librelp client accepts from a server.
DEFAULT_MAX_RECEIVE = 128 * 1024
# librelp's RELP_DFLT_WINDOW_SIZE: unanswered commands a client keeps in flight.
DEFAULT_WINDOW = 128
RELP_VERSION = 1
HINT_TXNR = 0
SERVERCLOSE = "serverclose"
OK = 200

_HEADER = re.compile(rb"(\d{1,9}) ([A-Za-z]{1,32}) (\d{1,9})([ \n])")
# What a header may look like before its end has arrived: anything else is garbage at once.
_HEADER_PREFIX = re.compile(rb"\d{0,9}|\d{1,9} [A-Za-z]{0,32}|\d{1,9} [A-Za-z]{1,32} \d{0,9}")
_MAX_HEADER = 9 + 1 + MAX_COMMAND_LEN + 1 + 9 + 1
_COMMAND = re.compile(r"[A-Za-z]{1,32}")
_RESPONSE = re.compile(rb"(\d{3})(?: ([^\n]*))?(?:\n(.*))?", re.DOTALL)
_SHOWN = 40  # bytes of offending input quoted in an error


class RelpError(Exception):
    """A RELP session cannot go on; `events` holds what was decoded before the failure."""

    def __init__(self, message: str, events: Sequence[Event] = ()) -> None:
        super().__init__(message)
        self.events: list[Event] = list(events)


class RelpFramingError(RelpError):
    """The byte stream is not a sequence of RELP frames."""


class RelpProtocolError(RelpError):
    """Well-formed frames that break the protocol (unknown txnr, missing offer, ...)."""


class RelpRefused(RelpError):
    """The server answered a command with a status other than 200."""

    def __init__(self, command: str, txnr: int, code: int, text: str, peer: str = "") -> None:
        who = f"RELP receiver {peer} refused" if peer else "refused"
        super().__init__(f"{who} {command} (txnr {txnr}): {code} {text}".rstrip())
        self.command = command
        self.txnr = txnr
        self.code = code
        self.text = text


@dataclass(frozen=True, slots=True)
class Frame:
    """One RELP frame."""

    txnr: int
    command: str
    data: bytes = b""

    def encode(self) -> bytes:
        """The frame on the wire."""
        return encode_frame(self.txnr, self.command, self.data)


def encode_frame(txnr: int, command: str, data: bytes = b"") -> bytes:
    """TXNR SP COMMAND SP DATALEN [SP DATA] LF; ValueError for values RELP cannot carry."""
    if not 0 <= txnr <= MAX_TXNR:
        raise ValueError(f"txnr {txnr} outside 0..{MAX_TXNR}")
    if _COMMAND.fullmatch(command) is None:
        raise ValueError(f"command {command!r} is not 1 to 32 ASCII letters")
    if len(data) > MAX_DATALEN:
        raise ValueError(f"{len(data)} octets exceed RELP's DATALEN limit of {MAX_DATALEN}")
    if not data:
        return b"%d %s 0\n" % (txnr, command.encode())
    return b"%d %s %d %s\n" % (txnr, command.encode(), len(data), data)


def next_txnr(txnr: int, limit: int = MAX_TXNR) -> int:
    """The txnr after txnr: one more, and 1 again after limit (999,999,999 in the spec)."""
    return 1 if txnr >= limit else txnr + 1


class FrameParser:
    """Incremental frame decoder: feed bytes as they arrive, take complete frames out.

    Garbage is reported as soon as it can be recognised (a non-digit where a frame starts, a
    header field too long, a missing LF trailer) with the offending bytes; the parser then
    stays failed, since nothing after a framing error can be trusted.
    """

    def __init__(self, max_data: int = DEFAULT_MAX_RECEIVE) -> None:
        self.max_data = max_data
        self._buf = bytearray()
        self._pos = 0
        self._header: tuple[int, str, int] | None = None
        self._error: RelpFramingError | None = None

    @property
    def buffered(self) -> int:
        """Octets received that do not make a complete frame yet."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        """Add received bytes."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, None if more bytes are needed; RelpFramingError on garbage."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        if self._header is None:
            m = _HEADER.match(buf, self._pos)
            if m is None:
                rest = bytes(buf[self._pos : self._pos + _MAX_HEADER])
                if len(rest) < _MAX_HEADER and _HEADER_PREFIX.fullmatch(rest):
                    return None
                raise self._fail(f"invalid frame header {rest[:_SHOWN]!r}")
            txnr, command, datalen = int(m[1]), m[2].decode("ascii"), int(m[3])
            if datalen == 0 and m[4] != b"\n":
                raise self._fail(f"{command} frame with DATALEN 0 must end with LF right away")
            if datalen > 0 and m[4] != b" ":
                raise self._fail(f"{command} frame with DATALEN {datalen} has no data")
            if datalen > self.max_data:
                raise self._fail(
                    f"{command} frame of {datalen} octets exceeds the limit of {self.max_data}"
                )
            self._pos = m.end()
            if datalen == 0:
                return Frame(txnr, command, b"")
            self._header = (txnr, command, datalen)
        txnr, command, datalen = self._header
        end = self._pos + datalen
        if len(buf) <= end:
            return None
        if buf[end] != 0x0A:
            shown = bytes(buf[end : end + _SHOWN])
            raise self._fail(f"{command} frame (txnr {txnr}) not ended by LF: {shown!r}")
        data = bytes(buf[self._pos : end])
        self._pos = end + 1
        self._header = None
        return Frame(txnr, command, data)

    def frames(self, data: bytes) -> list[Frame]:
        """Feed data and return every frame completed by it."""
        self.feed(data)
        out: list[Frame] = []
        while (frame := self.next_frame()) is not None:
            out.append(frame)
        return out

    def _fail(self, message: str) -> RelpFramingError:
        self._error = RelpFramingError(message)
        return self._error


@dataclass(frozen=True, slots=True)
class Response:
    """The data of an rsp frame: status code, human-readable text, command data."""

    code: int
    text: str = ""
    body: bytes = b""

    @property
    def ok(self) -> bool:
        """True for 200."""
        return self.code == OK


def parse_response(data: bytes) -> Response:
    """Parse rsp data (``200 OK``, optionally LF and command data)."""
    m = _RESPONSE.fullmatch(data)
    if m is None:
        raise RelpProtocolError(f"invalid response {data[:_SHOWN]!r}: expected a 3-digit status")
    text = (m[2] or b"").decode("utf-8", "replace")
    return Response(int(m[1]), text, m[3] or b"")


def encode_response(response: Response) -> bytes:
    """rsp data for a response (what a server sends)."""
    head = b"%03d %s" % (response.code, response.text.encode())
    return head + b"\n" + response.body if response.body else head


Offers = dict[str, list[str]]


def encode_offers(offers: Mapping[str, Sequence[str]]) -> bytes:
    """One ``name=value,value`` line per offer, joined by LF."""
    lines = []
    for name, values in offers.items():
        if not name or any(c in name for c in "=\n"):
            raise ValueError(f"invalid offer name {name!r}")
        if any(not v or any(c in v for c in ",\n") for v in values):
            raise ValueError(f"invalid value in offer {name}: {list(values)!r}")
        lines.append(f"{name}={','.join(values)}")
    return "\n".join(lines).encode()


def parse_offers(data: bytes) -> Offers:
    """Offers from open or its response (empty lines skipped, values split at commas)."""
    offers: Offers = {}
    for line in data.decode("utf-8", "replace").split("\n"):
        if not line:
            continue
        name, _, values = line.partition("=")
        offers[name] = [v for v in values.split(",") if v]
    return offers


def client_offers(software: str = "egressgw") -> Offers:
    """What the client offers in open: RELP version 1, the syslog command, its name."""
    return {
        "relp_version": [str(RELP_VERSION)],
        "relp_software": [software],
        "commands": ["syslog"],
    }


@dataclass(frozen=True, slots=True)
class Opened:
    """The server accepted the session."""

    version: int
    offers: Offers


@dataclass(frozen=True, slots=True)
class Acked:
    """A syslog command was answered 200 OK: the receiver has the message."""

    txnr: int


@dataclass(frozen=True, slots=True)
class Refused:
    """A syslog command was answered with another status."""

    txnr: int
    code: int
    text: str


@dataclass(frozen=True, slots=True)
class ServerClosed:
    """The server announced it closes the session (serverclose hint)."""


@dataclass(frozen=True, slots=True)
class Closed:
    """The server answered our close."""


Event = Opened | Acked | Refused | ServerClosed | Closed
State = Literal["new", "opening", "open", "closing", "closed"]


class ClientSession:
    """One RELP client session: txnr numbering, the commands in flight, and their answers.

    Use: `open()` and send its bytes; feed received bytes to `receive()` until it returns
    `Opened`; then `syslog()` per message (each gets its txnr) and `receive()` the `Acked` /
    `Refused` answers; `close()` at the end. A `ServerClosed` event, a `RelpError` or a lost
    connection ends the session: commands still in flight must be sent again in a new one.
    """

    def __init__(
        self,
        *,
        software: str = "egressgw",
        max_data: int = DEFAULT_MAX_RECEIVE,
        max_txnr: int = MAX_TXNR,
    ) -> None:
        if not 1 <= max_txnr <= MAX_TXNR:
            raise ValueError(f"max_txnr must be 1..{MAX_TXNR}")
        self.software = software
        self.max_txnr = max_txnr
        self.state: State = "new"
        self.server_closed = False
        self.version: int | None = None
        self.offers: Offers = {}
        self._parser = FrameParser(max_data)
        self._last = 0
        self._pending: dict[int, str] = {}

    @property
    def ready(self) -> bool:
        """Open, and the server has not announced a close: new commands may be sent."""
        return self.state == "open" and not self.server_closed

    @property
    def outstanding(self) -> int:
        """Commands sent and not answered yet."""
        return len(self._pending)

    @property
    def exhausted(self) -> bool:
        """The next txnr would wrap to 1, which librelp servers reject: open a new session."""
        return self._last >= self.max_txnr

    def open(self) -> bytes:
        """The open command with our offers (txnr 1)."""
        if self.state != "new":
            raise RelpProtocolError(f"open in state {self.state}")
        self.state = "opening"
        return self._command("open", encode_offers(client_offers(self.software)))[1]

    def syslog(self, message: bytes) -> tuple[int, bytes]:
        """A syslog command for one message: its txnr and its frame."""
        if not self.ready:
            state = "closed by the server" if self.server_closed else self.state
            raise RelpProtocolError(f"cannot send syslog: session is {state}")
        return self._command("syslog", message)

    def close(self) -> bytes:
        """The close command; send no other command after it."""
        if self.state != "open":
            raise RelpProtocolError(f"close in state {self.state}")
        self.state = "closing"
        return self._command("close", b"")[1]

    def receive(self, data: bytes) -> list[Event]:
        """Decode received bytes into events; RelpError (with the events before it) if bad."""
        events: list[Event] = []
        self._parser.feed(data)
        try:
            while (frame := self._parser.next_frame()) is not None:
                event = self._handle(frame)
                if event is not None:
                    events.append(event)
        except RelpError as exc:
            exc.events[:0] = events
            raise
        return events

    def _command(self, command: str, data: bytes) -> tuple[int, bytes]:
        txnr = next_txnr(self._last, self.max_txnr)
        if txnr in self._pending:
            raise RelpProtocolError(f"txnr {txnr} still in flight: window larger than txnr space")
        frame = encode_frame(txnr, command, data)
        self._last = txnr
        self._pending[txnr] = command
        return txnr, frame

    def _handle(self, frame: Frame) -> Event | None:
        if frame.txnr == HINT_TXNR:
            if frame.command == SERVERCLOSE:
                self.server_closed = True
                return ServerClosed()
            return None  # other hints are advisory (spec: losing one must do no harm)
        if frame.command != "rsp":
            raise RelpProtocolError(f"server sent command {frame.command!r} (txnr {frame.txnr})")
        command = self._pending.pop(frame.txnr, None)
        if command is None:
            raise RelpProtocolError(f"response to txnr {frame.txnr}, which is not in flight")
        if command == "close":
            self.state = "closed"
            return Closed()
        response = parse_response(frame.data)
        if command == "open":
            return self._opened(frame.txnr, response)
        if response.ok:
            return Acked(frame.txnr)
        return Refused(frame.txnr, response.code, response.text)

    def _opened(self, txnr: int, response: Response) -> Opened:
        if not response.ok:
            raise RelpRefused("open", txnr, response.code, response.text)
        offers = parse_offers(response.body)
        versions = offers.get("relp_version", [])
        if len(versions) != 1 or not versions[0].isdigit():
            raise RelpProtocolError(f"open response has no valid relp_version offer: {offers!r}")
        version = int(versions[0])
        if version > RELP_VERSION:
            raise RelpProtocolError(f"server speaks RELP version {version}, newer than ours")
        if "syslog" not in offers.get("commands", []):
            raise RelpProtocolError("server does not accept the syslog command")
        self.state = "open"
        self.version = version
        self.offers = offers
        return Opened(version, offers)
