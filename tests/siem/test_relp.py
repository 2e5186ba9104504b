"""Tests for the RELP core (siem.relp): frames, the incremental parser, offers, the session."""

from __future__ import annotations

import itertools
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from siem.relp import (
    MAX_TXNR,
    Acked,
    ClientSession,
    Closed,
    Frame,
    FrameParser,
    Opened,
    Refused,
    RelpFramingError,
    RelpProtocolError,
    RelpRefused,
    Response,
    ServerClosed,
    encode_frame,
    encode_offers,
    encode_response,
    next_txnr,
    parse_offers,
    parse_response,
)

# What librelp 1.11 (rsyslog's imrelp) answered to our open, byte for byte.
LIBRELP_OPEN_RSP = (
    b"1 rsp 93 200 OK\nrelp_version=0\n"
    b"relp_software=librelp,1.11.0,http://librelp.adiscon.com\ncommands=syslog\n"
)
MAX_DATA = 4096

commands = st.text(alphabet=string.ascii_letters, min_size=1, max_size=32)
frames = st.builds(
    Frame,
    txnr=st.integers(0, MAX_TXNR),
    command=commands,
    data=st.binary(max_size=600),
)


def parse_all(parser: FrameParser, chunks: list[bytes]) -> list[Frame]:
    out: list[Frame] = []
    for chunk in chunks:
        out += parser.frames(chunk)
    return out


def split(wire: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(wire)]
    return [wire[a:b] for a, b in itertools.pairwise(points)]


def opened_session(**kwargs: int) -> ClientSession:
    session = ClientSession(**kwargs)
    session.open()
    assert isinstance(session.receive(LIBRELP_OPEN_RSP)[0], Opened)
    return session


# -- frames ---------------------------------------------------------------------------------


def test_encode_frame_wire_format() -> None:
    """TXNR SP COMMAND SP DATALEN [SP DATA] LF; no data means no SP after DATALEN."""
    assert encode_frame(2, "syslog", b"<134>1 x") == b"2 syslog 8 <134>1 x\n"
    assert encode_frame(0, "serverclose") == b"0 serverclose 0\n"
    assert encode_frame(MAX_TXNR, "close") == b"999999999 close 0\n"


@pytest.mark.parametrize(
    ("txnr", "command"),
    [(-1, "rsp"), (MAX_TXNR + 1, "rsp"), (1, ""), (1, "a" * 33), (1, "sys log"), (1, "rsp1")],
)
def test_encode_frame_refuses_what_relp_cannot_carry(txnr: int, command: str) -> None:
    """txnr outside 0..999,999,999 and commands that are not 1-32 letters are refused."""
    with pytest.raises(ValueError):
        encode_frame(txnr, command, b"x")


@given(st.lists(frames, max_size=12), st.lists(st.integers(0, 10_000), max_size=12))
def test_round_trip_in_any_split(items: list[Frame], cuts: list[int]) -> None:
    """Encoded frames parse back identically however the byte stream is cut into reads."""
    wire = b"".join(f.encode() for f in items)
    parser = FrameParser(max_data=MAX_DATA)
    assert parse_all(parser, split(wire, [c % (len(wire) + 1) for c in cuts])) == items
    assert parser.buffered == 0


@given(st.lists(frames, min_size=1, max_size=5))
def test_round_trip_byte_by_byte(items: list[Frame]) -> None:
    """Feeding one byte at a time yields the same frames, each once it is complete."""
    wire = b"".join(f.encode() for f in items)
    parser = FrameParser(max_data=MAX_DATA)
    assert parse_all(parser, [wire[i : i + 1] for i in range(len(wire))]) == items


@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=4))
def test_arbitrary_bytes_parse_or_fail_clearly(blob: bytes, cuts: list[int]) -> None:
    """Any input yields frames, waits for more, or raises RelpFramingError; nothing else."""
    parser = FrameParser(max_data=MAX_DATA)
    try:
        parse_all(parser, split(blob, [c % (len(blob) + 1) for c in cuts]))
    except RelpFramingError as exc:
        assert str(exc)


@given(st.lists(frames, max_size=4), st.binary(min_size=1, max_size=50))
def test_garbage_after_good_frames(items: list[Frame], garbage: bytes) -> None:
    """Frames before garbage come out; the garbage itself raises, and so does every later call."""
    garbage = b"#" + garbage  # a frame never starts with '#'
    parser = FrameParser(max_data=MAX_DATA)
    parser.feed(b"".join(f.encode() for f in items) + garbage)
    got = []
    with pytest.raises(RelpFramingError, match="invalid frame header"):
        while (frame := parser.next_frame()) is not None:
            got.append(frame)
    assert got == items
    with pytest.raises(RelpFramingError):
        parser.next_frame()


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"hello\n", "invalid frame header b'hello"),
        (b"1234567890 rsp 0\n", "invalid frame header"),
        (b"1 rsp1 0\n", "invalid frame header"),
        (b"1 " + b"a" * 33, "invalid frame header"),
        (b"1 rsp 1234567890 x", "invalid frame header"),
        (b"-1 rsp 0\n", "invalid frame header"),
        (b"1 rsp 0\r\n", "invalid frame header"),
        (b"1 rsp 0 \n", "DATALEN 0 must end with LF"),
        (b"1 rsp 3\nabc\n", "DATALEN 3 has no data"),
        (b"7 rsp 3 abcX", r"rsp frame \(txnr 7\) not ended by LF: b'X'"),
        (b"1 rsp 4097 ", "4097 octets exceeds the limit of 4096"),
    ],
)
def test_garbage_is_named(wire: bytes, message: str) -> None:
    """Each kind of framing error is reported with what was wrong."""
    with pytest.raises(RelpFramingError, match=message):
        FrameParser(max_data=MAX_DATA).frames(wire)


def test_incomplete_frames_wait() -> None:
    """A valid prefix of a frame is held until the rest arrives."""
    parser = FrameParser()
    for part in [b"12", b" rs", b"p 6", b" 200 ", b"OK"]:
        assert parser.frames(part) == []
    assert parser.frames(b"\n") == [Frame(12, "rsp", b"200 OK")]


def test_data_may_contain_anything() -> None:
    """DATA is counted, not delimited: LF, spaces and digits inside it are just data."""
    data = b"1 rsp 0\n\n \x00\xff200"
    assert FrameParser().frames(encode_frame(3, "syslog", data)) == [Frame(3, "syslog", data)]


# -- txnr -----------------------------------------------------------------------------------


@given(st.integers(1, MAX_TXNR))
def test_next_txnr_counts_up_and_wraps_to_one(txnr: int) -> None:
    """After 999,999,999 comes 1 (never 0, which is for hints); otherwise one more."""
    nxt = next_txnr(txnr)
    assert 1 <= nxt <= MAX_TXNR
    assert nxt == (1 if txnr == MAX_TXNR else txnr + 1)


# -- responses and offers -------------------------------------------------------------------


@given(
    st.integers(100, 999),
    st.text(st.characters(blacklist_characters="\n", blacklist_categories=["Cs"]), max_size=80),
    st.binary(max_size=100),
)
def test_response_round_trip(code: int, text: str, body: bytes) -> None:
    """rsp data parses back to code, text and command data."""
    response = Response(code, text, body)
    assert parse_response(encode_response(response)) == response


@pytest.mark.parametrize("data", [b"", b"OK", b"20 OK", b"2000 OK", b"abc"])
def test_response_garbage(data: bytes) -> None:
    """rsp data without a 3-digit status is a protocol error."""
    with pytest.raises(RelpProtocolError, match="expected a 3-digit status"):
        parse_response(data)


names = st.text(st.characters(blacklist_characters="=\n", blacklist_categories=["Cs"]), min_size=1)
values = st.text(st.characters(blacklist_characters=",\n", blacklist_categories=["Cs"]), min_size=1)


@given(st.dictionaries(names, st.lists(values, max_size=4), max_size=5))
def test_offers_round_trip(offers: dict[str, list[str]]) -> None:
    """Offers encode one per line and parse back, values in order."""
    assert parse_offers(encode_offers(offers)) == offers


def test_offers_of_librelp() -> None:
    """librelp's answer (trailing LF included) parses to its three offers."""
    assert parse_offers(
        b"relp_version=0\nrelp_software=librelp,1.11.0,http://x\ncommands=syslog\n"
    ) == {
        "relp_version": ["0"],
        "relp_software": ["librelp", "1.11.0", "http://x"],
        "commands": ["syslog"],
    }


# -- session --------------------------------------------------------------------------------


def test_open_offers_and_librelp_answer() -> None:
    """open is txnr 1 with relp_version=1 and commands=syslog; librelp's version 0 is accepted."""
    session = ClientSession()
    frame = FrameParser().frames(session.open())[0]
    assert (frame.txnr, frame.command) == (1, "open")
    assert parse_offers(frame.data)["relp_version"] == ["1"]
    assert parse_offers(frame.data)["commands"] == ["syslog"]
    assert not session.ready
    [event] = session.receive(LIBRELP_OPEN_RSP)
    assert isinstance(event, Opened) and event.version == 0
    assert session.ready


@given(st.permutations(list(range(10))))
def test_pipelined_answers_in_any_order(order: list[int]) -> None:
    """Every syslog command gets its own txnr; answers match whatever their order."""
    session = opened_session()
    txnrs = [session.syslog(b"m%d" % i)[0] for i in range(10)]
    assert txnrs == list(range(2, 12))
    assert session.outstanding == 10
    wire = b"".join(encode_frame(txnrs[i], "rsp", b"200 OK") for i in order)
    assert session.receive(wire) == [Acked(txnrs[i]) for i in order]
    assert session.outstanding == 0


@given(st.lists(st.integers(1, 4), min_size=1, max_size=40))
def test_txnr_wraps_within_a_small_space(bursts: list[int]) -> None:
    """With max_txnr 7 txnrs run 1..7 and wrap to 1; exhausted says when the next would wrap."""
    session = opened_session(max_txnr=7)
    expected = 1
    for n in bursts:
        sent = []
        for _ in range(n):
            assert session.exhausted == (expected == 7)
            txnr, _frame = session.syslog(b"x")
            expected = next_txnr(expected, 7)
            assert txnr == expected
            sent.append(txnr)
        assert session.receive(b"".join(encode_frame(t, "rsp", b"200 OK") for t in sent)) == [
            Acked(t) for t in sent
        ]


def test_window_larger_than_txnr_space_is_refused() -> None:
    """A txnr still in flight is never reused."""
    session = opened_session(max_txnr=3)
    assert [session.syslog(m)[0] for m in (b"a", b"b", b"c")] == [2, 3, 1]
    with pytest.raises(RelpProtocolError, match="txnr 2 still in flight"):
        session.syslog(b"d")


def test_refusal_is_an_event() -> None:
    """A non-200 answer to syslog is reported with its code and text."""
    session = opened_session()
    txnr, _ = session.syslog(b"x")
    assert session.receive(encode_frame(txnr, "rsp", b"500 command disabled")) == [
        Refused(txnr, 500, "command disabled")
    ]


def test_open_refused() -> None:
    """A non-200 answer to open raises RelpRefused with the server's reason."""
    session = ClientSession()
    session.open()
    with pytest.raises(RelpRefused, match=r"refused open \(txnr 1\): 500 go away") as info:
        session.receive(encode_frame(1, "rsp", b"500 go away"))
    assert (info.value.code, info.value.text) == (500, "go away")


@pytest.mark.parametrize(
    ("offers", "message"),
    [
        (b"commands=syslog", "no valid relp_version"),
        (b"relp_version=x\ncommands=syslog", "no valid relp_version"),
        (b"relp_version=2\ncommands=syslog", "RELP version 2, newer than ours"),
        (b"relp_version=1\ncommands=", "does not accept the syslog command"),
    ],
)
def test_open_answer_must_fit(offers: bytes, message: str) -> None:
    """The server must speak RELP version <= 1 and accept syslog."""
    session = ClientSession()
    session.open()
    with pytest.raises(RelpProtocolError, match=message):
        session.receive(encode_frame(1, "rsp", b"200 OK\n" + offers))


def test_serverclose_ends_the_session() -> None:
    """serverclose (txnr 0) is an event; no new command may follow; answers before it count."""
    session = opened_session()
    a, _ = session.syslog(b"a")
    b, _ = session.syslog(b"b")
    events = session.receive(encode_frame(a, "rsp", b"200 OK") + b"0 serverclose 0\n")
    assert events == [Acked(a), ServerClosed()]
    assert not session.ready and session.outstanding == 1 and b == a + 1
    with pytest.raises(RelpProtocolError, match="closed by the server"):
        session.syslog(b"c")


def test_close_answered_without_data() -> None:
    """librelp answers close with an empty rsp."""
    session = opened_session()
    close = session.close()
    assert close == b"2 close 0\n"
    assert session.receive(b"2 rsp 0\n0 serverclose 0\n") == [Closed(), ServerClosed()]
    assert session.state == "closed"


def test_unknown_hints_are_ignored() -> None:
    """Hints other than serverclose are advisory."""
    session = opened_session()
    assert session.receive(b"0 someday 3 abc\n") == []
    assert session.ready


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"5 rsp 6 200 OK\n", "txnr 5, which is not in flight"),
        (b"2 syslog 1 x\n", "server sent command 'syslog'"),
    ],
)
def test_protocol_errors_keep_earlier_events(wire: bytes, message: str) -> None:
    """A bad frame raises RelpProtocolError; answers decoded before it travel with the error."""
    session = opened_session()
    txnr, _ = session.syslog(b"x")
    with pytest.raises(RelpProtocolError, match=message) as info:
        session.receive(encode_frame(txnr, "rsp", b"200 OK") + wire)
    assert info.value.events == [Acked(txnr)]
