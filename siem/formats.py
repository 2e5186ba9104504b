"""Output formats: pure functions of an ECS event dict (no sockets, no clocks).

* `to_json_line`: one ECS document as a JSON line (the spool payload, file/stdout/webhook).
* `to_rfc5424`: an RFC 5424 syslog message whose body is JSON, CEF or LEEF 2.0, with
  structured data ``[egressgw@32473 id=".." action=".." ...]``; PARAM-VALUE escapes
  ``"``, ``\\`` and ``]`` with a backslash (RFC 5424 section 6.3.3). Header fields are
  PRINTUSASCII without spaces, or ``-`` (NILVALUE).
* `frame_octet_count` / `parse_octet_frame`: RFC 6587 octet-counting framing for TCP/TLS.
* `to_cef`: ArcSight CEF:0. Header fields escape ``\\`` and ``|``; extension values escape
  ``\\`` and ``=``, and write CR/LF as ``\\r``/``\\n``.
* `to_leef`: QRadar LEEF 2.0 with a tab delimiter (declared as ``x09``). LEEF defines no
  escape for attribute values, so tab, CR and LF in values become a space; header fields
  escape ``\\`` and ``|``.
* `to_hec`: one Splunk HEC event object; `to_bulk_actions`: Elasticsearch ``create``
  operations with ``_id`` derived from ``event.id`` (`bulk_id`), so a retry never duplicates.

`CEF_FIELDS` and `LEEF_FIELDS` are the field mapping tables (docs/siem.md renders them).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Literal

import orjson

VENDOR = "egressgw"
PRODUCT = "egressgw"
VERSION = "0.1"
NILVALUE = "-"
DEFAULT_SD_ID = "egressgw@32473"
DEFAULT_APP_NAME = "egressgw"
DEFAULT_FACILITY = 16  # local0
MAX_ID_BYTES = 512  # Elasticsearch rejects longer _id values
LEEF_DELIMITER = "\t"
NON_STR_KEYS = orjson.OPT_NON_STR_KEYS

Event = Mapping[str, Any]
BodyFormat = Literal["json", "cef", "leef"]

# (CEF extension key, ECS path); "a|b" means a, else b. cs labels are added by to_cef.
CEF_FIELDS: tuple[tuple[str, str], ...] = (
    ("rt", "@timestamp"),
    ("externalId", "event.id"),
    ("act", "event.action"),
    ("outcome", "event.outcome"),
    ("reason", "event.reason"),
    ("src", "source.ip"),
    ("spt", "source.port"),
    ("dst", "destination.ip"),
    ("dpt", "destination.port"),
    ("dhost", "destination.domain"),
    ("request", "url.full"),
    ("proto", "network.transport"),
    ("app", "network.protocol"),
    ("out", "source.bytes"),
    ("in", "destination.bytes"),
    ("suser", "user.name"),
    ("cs1", "kubernetes.namespace|orchestrator.namespace"),
    ("cs2", "kubernetes.pod.name"),
    ("cs3", "kubernetes.labels.app|service.name"),
    ("cs4", "rule.name"),
    ("cs5", "rule.ruleset"),
    ("cs6", "threat.feed.name"),
)
CEF_LABELS: dict[str, str] = {
    "cs1": "namespace",
    "cs2": "pod",
    "cs3": "app",
    "cs4": "rule",
    "cs5": "tier",
    "cs6": "threatFeed",
}

# (LEEF 2.0 attribute, ECS path); names in camelCase are QRadar predefined attributes.
LEEF_FIELDS: tuple[tuple[str, str], ...] = (
    ("devTime", "@timestamp"),
    ("externalId", "event.id"),
    ("action", "event.action"),
    ("outcome", "event.outcome"),
    ("reason", "event.reason"),
    ("src", "source.ip"),
    ("srcPort", "source.port"),
    ("dst", "destination.ip"),
    ("dstPort", "destination.port"),
    ("dstHost", "destination.domain"),
    ("url", "url.full"),
    ("proto", "network.transport"),
    ("appProto", "network.protocol"),
    ("srcBytes", "source.bytes"),
    ("dstBytes", "destination.bytes"),
    ("usrName", "user.name"),
    ("namespace", "kubernetes.namespace|orchestrator.namespace"),
    ("pod", "kubernetes.pod.name"),
    ("app", "kubernetes.labels.app|service.name"),
    ("rule", "rule.name"),
    ("tier", "rule.ruleset"),
    ("threatFeed", "threat.feed.name"),
)
LEEF_TIME_FORMAT = "yyyy-MM-dd'T'HH:mm:ss.SSSX"

# Structured-data parameters in every RFC 5424 message: (PARAM-NAME, ECS path).
SD_FIELDS: tuple[tuple[str, str], ...] = (
    ("id", "event.id"),
    ("action", "event.action"),
    ("outcome", "event.outcome"),
    ("src", "source.ip"),
    ("dst", "destination.domain"),
    ("dstIp", "destination.ip"),
    ("dstPort", "destination.port"),
    ("namespace", "kubernetes.namespace|orchestrator.namespace"),
    ("app", "kubernetes.labels.app|service.name"),
    ("rule", "rule.name"),
)


@functools.lru_cache(maxsize=256)
def _parts(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


def get_path(event: Event, path: str) -> Any:
    """Value at a dotted ECS path (nested dicts or a flat dotted key); "a|b": first found."""
    if "|" in path:
        for alternative in path.split("|"):
            value = get_path(event, alternative)
            if value is not None:
                return value
        return None
    if path in event:
        return event[path]
    node: Any = event
    for part in _parts(path):
        if type(node) is not dict and not isinstance(node, Mapping):
            return None
        node = node.get(part)
        if node is None:
            return None
    return node


def _text(value: Any) -> str | None:
    if type(value) is str:
        return value
    if value is None or isinstance(value, Mapping):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        items = [t for t in (_text(v) for v in value) if t is not None]
        return ",".join(items) if items else None
    return str(value)


def to_json_line(event: Event) -> bytes:
    """One event as compact JSON followed by a newline."""
    return orjson.dumps(event, option=orjson.OPT_NON_STR_KEYS) + b"\n"


def classify_severity(event: Event) -> int:
    """Severity 0..10 (CEF scale): ECS event.severity if set, else alert > denied > other."""
    sev = get_path(event, "event.severity")
    if isinstance(sev, int) and not isinstance(sev, bool):
        return max(0, min(10, sev))
    kind = get_path(event, "event.kind")
    types = get_path(event, "event.type") or ()
    if kind == "alert" or get_path(event, "threat.indicator") is not None:
        return 8
    if "denied" in types or get_path(event, "event.outcome") == "failure":
        return 5
    return 3


def _syslog_severity(event: Event) -> int:
    sev = classify_severity(event)
    return 4 if sev >= 8 else 5 if sev >= 5 else 6


_NON_PRINT = re.compile(r"[^!-~]")


def _header_field(value: str | None, limit: int) -> str:
    if not value:
        return NILVALUE
    return _NON_PRINT.sub("_", value)[:limit]


_RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)$")


def _timestamp(event: Event) -> str:
    ts = event.get("@timestamp")
    if isinstance(ts, str) and _RFC3339.match(ts):
        return ts
    return NILVALUE


def escape_param_value(value: str) -> str:
    """Escape an RFC 5424 PARAM-VALUE: backslash before '"', '\\' and ']'."""
    if '"' not in value and "\\" not in value and "]" not in value:
        return value
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def to_structured_data(event: Event, sd_id: str = DEFAULT_SD_ID) -> str:
    """The STRUCTURED-DATA element for an event, or '-' when no field is present."""
    params = []
    for name, path in SD_FIELDS:
        text = _text(get_path(event, path))
        if text is not None:
            params.append(f'{name}="{escape_param_value(text)}"')
    if not params:
        return NILVALUE
    return f"[{sd_id} {' '.join(params)}]"


def to_rfc5424(
    event: Event,
    fmt: BodyFormat = "json",
    *,
    app_name: str = DEFAULT_APP_NAME,
    hostname: str | None = None,
    facility: int = DEFAULT_FACILITY,
    procid: str | None = None,
    sd_id: str = DEFAULT_SD_ID,
    json_body: bytes | None = None,
) -> bytes:
    """One RFC 5424 message (no framing) with structured data and a JSON, CEF or LEEF body.

    json_body: the event already serialised (the spool payload), reused for fmt="json".
    """
    pri = facility * 8 + _syslog_severity(event)
    host = (
        hostname
        or _text(get_path(event, "observer.hostname"))
        or _text(get_path(event, "host.hostname"))
    )
    msgid = _text(get_path(event, "event.action"))
    header = " ".join(
        (
            f"<{pri}>1",
            _timestamp(event),
            _header_field(host, 255),
            _header_field(app_name, 48),
            _header_field(procid, 128),
            _header_field(msgid, 32),
            to_structured_data(event, sd_id),
        )
    )
    if fmt == "json":
        body = json_body if json_body is not None else orjson.dumps(event, option=NON_STR_KEYS)
    elif fmt == "cef":
        body = to_cef(event).encode()
    elif fmt == "leef":
        body = to_leef(event).encode()
    else:
        raise ValueError(f"unknown syslog body format {fmt!r}")
    return header.encode() + b" " + body


def frame_octet_count(message: bytes) -> bytes:
    """RFC 6587 octet-counting frame: decimal length, a space, the message (never empty)."""
    if not message:
        raise ValueError("RFC 6587 frames cannot be empty")
    return b"%d %b" % (len(message), message)


def parse_octet_frame(buf: bytes) -> tuple[bytes, bytes] | None:
    """Split one octet-counted frame off buf: (message, rest), None if incomplete, or ValueError."""
    space = buf.find(b" ", 0, 11)
    if space == -1:
        if len(buf) >= 11 or not buf[: len(buf)].isdigit():
            raise ValueError("octet-counting frame must start with a decimal length")
        return None
    digits = buf[:space]
    if not digits.isdigit() or digits.startswith(b"0"):
        raise ValueError(f"invalid octet count {digits!r}")
    end = space + 1 + int(digits)
    if len(buf) < end:
        return None
    return buf[space + 1 : end], buf[end:]


def escape_cef_header(value: str) -> str:
    """Escape a CEF header field: '\\' and '|' get a backslash; line breaks become spaces."""
    value = value.replace("\\", "\\\\").replace("|", "\\|")
    return value.replace("\r", " ").replace("\n", " ")


def escape_cef_value(value: str) -> str:
    """Escape a CEF extension value: '\\' and '=' get a backslash; CR/LF become \\r and \\n."""
    value = value.replace("\\", "\\\\").replace("=", "\\=")
    return value.replace("\r", "\\r").replace("\n", "\\n")


def _epoch_ms(ts: Any) -> str | None:
    if not isinstance(ts, str):
        return None
    try:
        dt = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        return None
    return str(int(dt.timestamp() * 1000))


def _signature(event: Event) -> str:
    return _text(get_path(event, "event.action")) or "event"


def _name(event: Event) -> str:
    message = _text(event.get("message"))
    if message:
        return message[:512]
    outcome = _text(get_path(event, "event.outcome")) or "unknown"
    return f"{_signature(event)} {outcome}"


def to_cef(event: Event) -> str:
    """ArcSight CEF:0 line for an event (see CEF_FIELDS)."""
    header = "|".join(
        escape_cef_header(v)
        for v in (
            VENDOR,
            PRODUCT,
            VERSION,
            _signature(event),
            _name(event),
            str(classify_severity(event)),
        )
    )
    ext: list[str] = []
    for key, path in CEF_FIELDS:
        raw = get_path(event, path)
        text = _epoch_ms(raw) if key == "rt" else _text(raw)
        if text is None:
            continue
        ext.append(f"{key}={escape_cef_value(text)}")
        if key in CEF_LABELS:
            ext.append(f"{key}Label={CEF_LABELS[key]}")
    return f"CEF:0|{header}|{' '.join(ext)}"


def escape_leef_header(value: str) -> str:
    """Escape a LEEF header field: '\\' and '|' get a backslash; controls become spaces."""
    value = value.replace("\\", "\\\\").replace("|", "\\|")
    return re.sub(r"[\x00-\x1f\x7f]", " ", value)


def clean_leef_value(value: str) -> str:
    """Make a LEEF attribute value safe: LEEF has no escape, so tab, CR and LF become spaces."""
    return re.sub(r"[\t\r\n]", " ", value)


def to_leef(event: Event) -> str:
    """QRadar LEEF 2.0 line with a tab delimiter (see LEEF_FIELDS)."""
    header = "|".join(escape_leef_header(v) for v in (VENDOR, PRODUCT, VERSION, _signature(event)))
    attrs = [f"sev={classify_severity(event)}"]
    for key, path in LEEF_FIELDS:
        text = _text(get_path(event, path))
        if text is None:
            continue
        attrs.append(f"{key}={clean_leef_value(text)}")
        if key == "devTime":
            attrs.append(f"devTimeFormat={LEEF_TIME_FORMAT}")
    return f"LEEF:2.0|{header}|x09|{LEEF_DELIMITER.join(attrs)}"


def _epoch_seconds(ts: Any) -> float | None:
    ms = _epoch_ms(ts)
    return int(ms) / 1000 if ms is not None else None


def to_hec(
    event: Event,
    *,
    index: str | None = None,
    source: str | None = None,
    sourcetype: str | None = None,
    host: str | None = None,
) -> bytes:
    """One Splunk HEC event object (batches are these objects concatenated)."""
    obj: dict[str, Any] = {}
    epoch = _epoch_seconds(event.get("@timestamp"))
    if epoch is not None:
        obj["time"] = epoch
    host = host or _text(get_path(event, "host.hostname"))
    for key, value in (("host", host), ("index", index), ("source", source)):
        if value:
            obj[key] = value
    if sourcetype:
        obj["sourcetype"] = sourcetype
    obj["event"] = event
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)


def bulk_id(event: Event, payload: bytes | None = None) -> str:
    """Deterministic Elasticsearch _id: event.id, else a SHA-256 of the document."""
    eid = _text(get_path(event, "event.id"))
    if eid and len(eid.encode()) <= MAX_ID_BYTES and not eid.startswith("_"):
        return eid
    data = payload if payload is not None else orjson.dumps(event, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(data).hexdigest()


def to_bulk_actions(
    events: Iterable[Event], index: str, payloads: Iterable[bytes] | None = None
) -> list[bytes]:
    """NDJSON lines for _bulk: a `create` op with a deterministic _id, then the document."""
    lines: list[bytes] = []
    docs = list(events)
    raws = list(payloads) if payloads is not None else [to_json_line(e) for e in docs]
    if len(raws) != len(docs):
        raise ValueError("payloads and events differ in length")
    for event, raw in zip(docs, raws, strict=True):
        op = {"create": {"_index": index, "_id": bulk_id(event, raw)}}
        lines.append(orjson.dumps(op))
        lines.append(raw.rstrip(b"\n"))
    return lines
