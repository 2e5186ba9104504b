"""Tests for the pure output formats: JSON lines, RFC 5424, CEF, LEEF 2.0, HEC, bulk."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from siem.formats import (
    bulk_id,
    classify_severity,
    escape_param_value,
    frame_octet_count,
    get_path,
    parse_octet_frame,
    to_bulk_actions,
    to_cef,
    to_hec,
    to_json_line,
    to_leef,
    to_rfc5424,
    to_structured_data,
)

EVENT: dict[str, Any] = {
    "@timestamp": "2026-11-24T10:00:00.123Z",
    "event": {"id": "ev-1", "action": "connect", "outcome": "success", "kind": "event"},
    "source": {"ip": "10.0.0.5", "port": 40000},
    "destination": {"domain": "example.com", "ip": "93.184.216.34", "port": 443},
    "orchestrator": {"namespace": "payments"},
    "service": {"name": "api"},
    "rule": {"name": "allow-example", "ruleset": "platform"},
    "network": {"transport": "tcp", "protocol": "tls"},
}

RFC5424 = re.compile(
    rb"^<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) (-|\[.*?(?<!\\)\]) (.*)$", re.DOTALL
)


def unescape_sd_value(text: str) -> tuple[str, str]:
    """Read one PARAM-VALUE body from text (after the opening quote): (value, rest)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in '"\\]':
            out.append(text[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out), text[i + 1 :]
        assert c != "]", "unescaped ] inside PARAM-VALUE"
        out.append(c)
        i += 1
    raise AssertionError("unterminated PARAM-VALUE")


def parse_sd(sd: str) -> dict[str, str]:
    """Parse one SD-ELEMENT into its params (enough for the tests)."""
    assert sd.startswith("[")
    rest = sd[1:]
    _, rest = rest.split(" ", 1)
    params: dict[str, str] = {}
    while True:
        name, rest = rest.split('="', 1)
        value, rest = unescape_sd_value(rest)
        params[name] = value
        if rest == "]":
            return params
        assert rest.startswith(" ")
        rest = rest[1:]


def parse_cef(line: str) -> tuple[list[str], dict[str, str]]:
    """Split a CEF line into unescaped header fields and extension pairs."""
    fields: list[str] = []
    cur: list[str] = []
    i = 0
    while len(fields) < 7:
        c = line[i]
        if c == "\\":
            cur.append(line[i + 1])
            i += 2
            continue
        if c == "|":
            fields.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    ext = line[i:]
    # Tokenise the extension: (char, escaped) pairs, then cut at unescaped '='.
    chars: list[tuple[str, bool]] = []
    j = 0
    unescape = {"\\": "\\", "=": "=", "n": "\n", "r": "\r"}
    while j < len(ext):
        if ext[j] == "\\":
            chars.append((unescape[ext[j + 1]], True))
            j += 2
        else:
            chars.append((ext[j], False))
            j += 1
    eqs = [k for k, (c, esc) in enumerate(chars) if c == "=" and not esc]
    pairs: dict[str, str] = {}
    starts = []
    for k in eqs:
        s = k
        while s > 0 and re.match(r"\w", chars[s - 1][0]) and not chars[s - 1][1]:
            s -= 1
        starts.append((s, k))
    for n, (s, k) in enumerate(starts):
        end = starts[n + 1][0] - 1 if n + 1 < len(starts) else len(chars)
        key = "".join(c for c, _ in chars[s:k])
        pairs[key] = "".join(c for c, _ in chars[k + 1 : end])
    return fields, pairs


def test_json_line_roundtrip() -> None:
    """A JSON line is one line that parses back to the event."""
    line = to_json_line(EVENT)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert orjson.loads(line) == EVENT


def test_get_path_nested_and_flat() -> None:
    """Dotted paths read nested dicts and flat dotted keys."""
    assert get_path(EVENT, "source.ip") == "10.0.0.5"
    assert get_path({"source.ip": "1.2.3.4"}, "source.ip") == "1.2.3.4"
    assert get_path(EVENT, "source.nope") is None


def test_rfc5424_header_and_structured_data() -> None:
    """The message has PRI, version, timestamp, app, msgid and the SD params from the event."""
    msg = to_rfc5424(EVENT, "json", hostname="node-1", facility=16)
    m = RFC5424.match(msg)
    assert m is not None
    assert int(m.group(1)) == 16 * 8 + 6
    assert m.group(2) == b"2026-11-24T10:00:00.123Z"
    assert m.group(3, 4, 6) == (b"node-1", b"egressgw", b"connect")
    params = parse_sd(m.group(7).decode())
    assert params["id"] == "ev-1" and params["namespace"] == "payments"
    assert orjson.loads(m.group(8)) == EVENT


def test_rfc5424_denied_and_alert_severity() -> None:
    """Denied events are notice (5), threat alerts warning (4), others informational (6)."""
    denied = {**EVENT, "event": {**EVENT["event"], "type": ["denied"], "outcome": "failure"}}
    alert = {**EVENT, "event": {**EVENT["event"], "kind": "alert"}}
    assert to_rfc5424(denied).startswith(b"<133>1 ")
    assert to_rfc5424(alert).startswith(b"<132>1 ")
    assert classify_severity({"event": {"severity": 42}}) == 10


def test_rfc5424_nil_values() -> None:
    """Missing fields become '-' and a bad timestamp is not copied into the header."""
    msg = to_rfc5424({"@timestamp": "yesterday"}, app_name="egressgw")
    assert msg.startswith(b"<134>1 - - egressgw - - - {")


def test_rfc5424_header_fields_are_printable() -> None:
    """Spaces and non-ASCII in header fields are replaced, never break the header."""
    event = {"event": {"action": "a b\u00e9c"}}
    m = RFC5424.match(to_rfc5424(event, hostname="h"))
    assert m is not None and m.group(6) == b"a_b_c"


@given(st.text())
def test_sd_param_value_escaping_roundtrips(value: str) -> None:
    """Any text survives PARAM-VALUE escaping: '"', '\\' and ']' are escaped, nothing else."""
    sd = to_structured_data({"event": {"id": value}})
    assert parse_sd(sd) == {"id": value}
    assert len(escape_param_value(value)) == len(value) + sum(value.count(c) for c in '"\\]')


@given(st.text(), st.text(min_size=1))
def test_cef_escaping_roundtrips(reason: str, action: str) -> None:
    """Header and extension values survive CEF escaping; the line never contains a newline."""
    event = {"event": {"id": "x", "action": action, "reason": reason}}
    line = to_cef(event)
    assert "\n" not in line and "\r" not in line
    fields, ext = parse_cef(line)
    assert fields[0] == "CEF:0"
    assert fields[4] == action.replace("\r", " ").replace("\n", " ")
    if reason:
        assert ext["reason"] == reason
    assert ext["externalId"] == "x"


def test_cef_mapping() -> None:
    """CEF carries the mapped fields, custom string labels and epoch-millisecond rt."""
    fields, ext = parse_cef(to_cef(EVENT))
    assert fields[1:4] == ["egressgw", "egressgw", "0.1"]
    assert ext["src"] == "10.0.0.5" and ext["dpt"] == "443" and ext["dhost"] == "example.com"
    assert ext["cs1"] == "payments" and ext["cs1Label"] == "namespace"
    assert ext["rt"] == "1795514400123"


def parse_leef(line: str) -> tuple[list[str], dict[str, str]]:
    """Split a LEEF 2.0 line into header fields and attributes."""
    parts = re.split(r"(?<!\\)\|", line, maxsplit=6)
    header, attrs = parts[:6], parts[6]
    out = {}
    for pair in attrs.split("\t"):
        key, _, value = pair.partition("=")
        out[key] = value
    return header, out


@given(st.text(), st.text(min_size=1, alphabet=st.characters(blacklist_characters="\\|")))
def test_leef_values_never_break_the_line(reason: str, action: str) -> None:
    """LEEF values lose tabs and line breaks (no escape exists); attributes stay separable."""
    event = {"event": {"id": "x", "action": action, "reason": reason}}
    line = to_leef(event)
    assert "\n" not in line and "\r" not in line
    header, attrs = parse_leef(line)
    assert header[0] == "LEEF:2.0" and header[5] == "x09"
    if reason:
        assert attrs["reason"] == re.sub(r"[\t\r\n]", " ", reason)
    assert attrs["externalId"] == "x"


def test_leef_header_escapes_pipe() -> None:
    """A '|' in the event id field of the header is escaped."""
    header, attrs = parse_leef(to_leef({"event": {"action": "a|b"}}))
    assert header[4] == "a\\|b"
    assert attrs["sev"] == "3"


def test_leef_mapping() -> None:
    """LEEF uses QRadar's predefined attribute names and declares devTimeFormat."""
    _, attrs = parse_leef(to_leef(EVENT))
    assert attrs["src"] == "10.0.0.5" and attrs["dstPort"] == "443"
    assert attrs["devTime"] == EVENT["@timestamp"] and "devTimeFormat" in attrs


def test_octet_counting_frames() -> None:
    """Frames are 'LEN SP MSG'; the parser splits them and waits for more bytes."""
    stream = frame_octet_count(b"hello") + frame_octet_count("h\u00e9".encode())
    assert stream.startswith(b"5 hello3 ")
    msg, rest = parse_octet_frame(stream)  # type: ignore[misc]
    assert msg == b"hello"
    assert parse_octet_frame(rest) == ("h\u00e9".encode(), b"")
    assert parse_octet_frame(b"12 abc") is None
    assert parse_octet_frame(b"12") is None
    with pytest.raises(ValueError):
        parse_octet_frame(b"x1 abc")
    with pytest.raises(ValueError):
        frame_octet_count(b"")


@given(st.lists(st.binary(min_size=1), max_size=5))
def test_octet_framing_roundtrips(messages: list[bytes]) -> None:
    """Any sequence of messages is recovered exactly from the framed stream."""
    stream = b"".join(frame_octet_count(m) for m in messages)
    out = []
    while stream:
        parsed = parse_octet_frame(stream)
        assert parsed is not None
        msg, stream = parsed
        out.append(msg)
    assert out == messages


def test_hec_event() -> None:
    """A HEC event carries time in epoch seconds, metadata and the ECS event."""
    obj = orjson.loads(to_hec(EVENT, index="main", sourcetype="_json", source="egressgw"))
    assert obj["time"] == pytest.approx(1795514400.123)
    assert obj["index"] == "main" and obj["event"] == EVENT


def test_bulk_actions_create_with_event_id() -> None:
    """Each event becomes a create op with _id = event.id followed by the document."""
    lines = to_bulk_actions([EVENT], "logs-egressgw-default")
    assert orjson.loads(lines[0]) == {"create": {"_index": "logs-egressgw-default", "_id": "ev-1"}}
    assert orjson.loads(lines[1]) == EVENT


def test_bulk_id_is_deterministic_without_event_id() -> None:
    """Without event.id the _id is a hash of the document, the same on every retry."""
    event = {"message": "no id"}
    assert bulk_id(event) == bulk_id(dict(event)) and len(bulk_id(event)) == 64
    assert bulk_id({"event": {"id": "_bad"}}) != "_bad"


def test_gateway_shaped_event_maps_kubernetes_fields() -> None:
    """The gateway's kubernetes.namespace and labels.app feed the namespace and app fields."""
    gw = {
        "event": {"id": "f.1", "action": "connection_denied", "type": ["connection", "denied"]},
        "kubernetes": {"namespace": "payments", "pod": {"name": "api-1"}, "labels": {"app": "api"}},
        "observer": {"hostname": "node-7"},
    }
    _, ext = parse_cef(to_cef(gw))
    assert (ext["cs1"], ext["cs2"], ext["cs3"]) == ("payments", "api-1", "api")
    _, attrs = parse_leef(to_leef(gw))
    assert attrs["namespace"] == "payments" and attrs["app"] == "api" and attrs["sev"] == "5"
    m = RFC5424.match(to_rfc5424(gw))
    assert m is not None and m.group(3) == b"node-7"
    assert parse_sd(m.group(7).decode())["namespace"] == "payments"
