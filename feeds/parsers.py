"""Feed format parsers: ``bytes -> ParseResult``, pure (no I/O, no clock).

Formats (``FORMATS``):

- ``lines``: one value per line, auto-detected as IP, CIDR, domain or URL; full-line comments
  start with ``#`` or ``;``; after the value, a ``#`` or ``;`` comment is allowed.
- ``hosts``: hosts-file lines ``IP name [name...]``; the names are domain indicators (localhost
  names skipped); a line holding only a name is accepted (mirrors strip the ``0.0.0.0``).
- ``csv``: one value per row from ``options.column``; the header is the first row, or the last
  ``#`` comment line (abuse.ch style), or none; quoted fields; ``", "`` separators tolerated.
- ``json``: ``options.path`` selects strings, or objects whose ``options.value_key`` is the value.
- ``spamhaus``: DROP/EDROP/DROPv6 text (``CIDR ; SBLnnn``) or JSON lines with the trailing
  ``{"type": "metadata", "records": N}`` record.
- ``stix``: STIX 2.0/2.1 bundles (see ``feeds.stix``); needs ``now``.

Common text rules: UTF-8 (one BOM allowed), any mix of ``\\n``/``\\r\\n``/``\\r\\r\\n`` line ends,
whitespace trimmed. A body that is not UTF-8 (binary garbage) raises ValueError; a bad line is
rejected and counted, never fatal. Trailers ``# END N entries`` and ``# Number of entries: N`` set
``expected`` (see ``ParseResult.truncated``).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

import orjson

from feeds import jsonpath, stix
from feeds.indicator import NO_PROVENANCE, IndicatorType, Provenance
from feeds.options import DEFAULT_OPTIONS, ParseOptions
from feeds.result import ParseResult, ResultBuilder, parse_timestamp

FORMATS = ("lines", "hosts", "csv", "json", "spamhaus", "stix")

_TRAILER = re.compile(
    r"^[#;]\s*(?:END\s+(?P<end>[\d,]+)\s+entries|Number of entries:\s*(?P<num>[\d,]+))\s*$",
    re.IGNORECASE,
)
HOSTS_SKIP_NAMES = frozenset(
    {
        "localhost",
        "localhost.localdomain",
        "local",
        "broadcasthost",
        "ip6-localhost",
        "ip6-loopback",
        "ip6-localnet",
        "ip6-mcastprefix",
        "ip6-allnodes",
        "ip6-allrouters",
        "ip6-allhosts",
        "0.0.0.0",
    }
)
HOSTS_SINKHOLES = frozenset({"0.0.0.0", "127.0.0.1", "::", "::1", "0"})


def decode_text(data: bytes) -> str:
    """Decode a feed body as UTF-8 (one BOM allowed), or raise ValueError."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"body is not UTF-8 text (byte {e.start})") from None
    if "\x00" in text:
        raise ValueError("body contains NUL bytes (binary data)")
    return text


def iter_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, trimmed line) for every non-empty line."""
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if line:
            yield number, line


def _check_trailer(builder: ResultBuilder, line: str, options: ParseOptions) -> None:
    if not options.check_trailer:
        return
    m = _TRAILER.match(line)
    if m is not None:
        builder.expected = int((m.group("end") or m.group("num")).replace(",", ""))


def _is_comment(line: str, options: ParseOptions) -> bool:
    return line.startswith(options.comment_prefixes)


def parse_lines(
    data: bytes,
    *,
    options: ParseOptions = DEFAULT_OPTIONS,
    provenance: Provenance = NO_PROVENANCE,
    blocklist: bool = True,
) -> ParseResult:
    """Parse a one-value-per-line list (IPs, CIDRs, domains, URLs mixed)."""
    builder = ResultBuilder(provenance, blocklist=blocklist, max_samples=options.max_samples)
    for number, line in iter_lines(decode_text(data)):
        if _is_comment(line, options):
            _check_trailer(builder, line, options)
            continue
        builder.records += 1
        value = line
        if " " in line or "\t" in line:
            value, rest = line.split(None, 1)
            if not rest.startswith(("#", ";")):
                builder.reject(number, line, "more than one value on the line")
                continue
        if ("#" in value or ";" in value) and "://" not in value:
            # An inline comment glued to the value ("1.2.3.4;x"); URLs may hold ';' and '#'.
            value = value.split("#", 1)[0].split(";", 1)[0]
        builder.add(value, number)
    return builder.result()


def parse_hosts(
    data: bytes,
    *,
    options: ParseOptions = DEFAULT_OPTIONS,
    provenance: Provenance = NO_PROVENANCE,
    blocklist: bool = True,
) -> ParseResult:
    """Parse a hosts file: the names after a sinkhole address are domain indicators."""
    builder = ResultBuilder(provenance, blocklist=blocklist, max_samples=options.max_samples)
    for number, line in iter_lines(decode_text(data)):
        if line.startswith("#"):
            _check_trailer(builder, line, options)
            continue
        tokens = line.split("#", 1)[0].split()
        if not tokens:
            continue
        builder.records += 1
        if len(tokens) == 1:
            # A mirror stripped the address: the line is a bare name.
            names = tokens
        else:
            address = tokens[0].split("%", 1)[0]
            names = [t for t in tokens[1:] if t.lower() not in HOSTS_SKIP_NAMES]
            if address not in HOSTS_SINKHOLES:
                if names:
                    builder.note("non-sinkhole-line")
                continue
        for name in names:
            if name.lower() in HOSTS_SKIP_NAMES:
                continue
            builder.add(name, number, only=IndicatorType.DOMAIN)
    return builder.result()


def _csv_row(line: str, delimiter: str) -> list[str]:
    return next(csv.reader((line,), delimiter=delimiter, skipinitialspace=True, strict=True))


def _resolve_column(
    spec: int | str | None, header: Sequence[str] | None, what: str, required: bool = False
) -> int | None:
    if spec is None:
        return None
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"{what}: columns are numbered from 1, got {spec}")
        return spec - 1
    if spec.isdigit():
        return _resolve_column(int(spec), header, what)
    if header is None:
        raise ValueError(f"{what}: column {spec!r} is a name but the file has no header")
    try:
        return list(header).index(spec)
    except ValueError:
        if not required:
            return None
        raise ValueError(f"{what}: no column {spec!r} in header {list(header)!r}") from None


def _cell(row: Sequence[str], index: int | None) -> str | None:
    if index is None or index >= len(row):
        return None
    value = row[index].strip()
    return None if value in ("", "None", "null") else value


def _row_provenance(
    base: Provenance,
    first_seen: object,
    reference: object,
    tags: object,
    confidence: object,
) -> Provenance:
    changes: dict[str, Any] = {}
    ts = parse_timestamp(first_seen)
    if ts is not None:
        changes["first_seen"] = ts
    if isinstance(reference, str | int) and str(reference) not in ("", "None"):
        changes["reference"] = str(reference)
    # Row tags come after the feed's own labels (the base tags), never instead of them.
    if isinstance(tags, str) and tags not in ("", "None"):
        changes["tags"] = base.tags + tuple(t.strip() for t in tags.split(",") if t.strip())
    elif isinstance(tags, list):
        changes["tags"] = base.tags + tuple(str(t) for t in tags)
    if isinstance(confidence, int | str) and str(confidence).isdigit():
        changes["confidence"] = min(100, int(confidence))
    return replace(base, **changes) if changes else base


def parse_csv(
    data: bytes,
    *,
    options: ParseOptions = DEFAULT_OPTIONS,
    provenance: Provenance = NO_PROVENANCE,
    blocklist: bool = True,
) -> ParseResult:
    """Parse a CSV feed: one value per row from the configured column."""
    builder = ResultBuilder(provenance, blocklist=blocklist, max_samples=options.max_samples)
    comments_before: list[str] = []
    rows: list[tuple[int, str]] = []
    for number, line in iter_lines(decode_text(data)):
        if line.startswith("#"):
            _check_trailer(builder, line, options)
            if not rows:
                comments_before.append(line)
            continue
        rows.append((number, line))
    header, rows = _csv_header(rows, comments_before, options)
    d = options.delimiter
    value_col = _resolve_column(options.column, header, "column", required=True)
    if value_col is None and rows:
        value_col = _guess_column(rows[0][1], d)
    fs_col = _resolve_column(options.first_seen_field, header, "first_seen_field")
    ref_col = _resolve_column(options.reference_field, header, "reference_field")
    tags_col = _resolve_column(options.tags_field, header, "tags_field")
    conf_col = _resolve_column(options.confidence_field, header, "confidence_field")
    with_meta = any(c is not None for c in (fs_col, ref_col, tags_col, conf_col))
    for number, line in rows:
        builder.records += 1
        try:
            row = _csv_row(line, d)
        except csv.Error as e:
            builder.reject(number, line, f"bad CSV: {e}")
            continue
        value = _cell(row, value_col)
        if value is None:
            builder.reject(number, line, "no value in the column")
            continue
        prov = provenance
        if with_meta:
            prov = _row_provenance(
                provenance,
                _cell(row, fs_col),
                _cell(row, ref_col),
                _cell(row, tags_col),
                _cell(row, conf_col),
            )
        builder.add(value, number, prov)
    return builder.result()


def _csv_header(
    rows: list[tuple[int, str]], comments: list[str], options: ParseOptions
) -> tuple[list[str] | None, list[tuple[int, str]]]:
    d = options.delimiter
    mode = options.header
    comment_header: list[str] | None = None
    if comments:
        try:
            comment_header = _csv_row(comments[-1].lstrip("#").strip(), d)
        except csv.Error:
            comment_header = None
    if mode == "none":
        return None, rows
    if mode == "row":
        if not rows:
            return None, rows
        return _csv_row(rows[0][1], d), rows[1:]
    if mode == "comment":
        if comment_header is None:
            raise ValueError("header: comment, but no '#' comment line precedes the data")
        return comment_header, rows
    # auto: a commented header has as many fields as the data; else a first row without any
    # indicator in it is a header row.
    if rows:
        try:
            first = _csv_row(rows[0][1], d)
        except csv.Error:
            return comment_header, rows
        if comment_header is not None and len(comment_header) == len(first) > 1:
            return comment_header, rows
        if _guess_column(rows[0][1], d) is None:
            return first, rows[1:]
    return comment_header, rows


def _guess_column(line: str, delimiter: str) -> int | None:
    try:
        row = _csv_row(line, delimiter)
    except csv.Error:
        return None
    probe = ResultBuilder(blocklist=False, max_samples=0)
    for index, cell in enumerate(row):
        if cell.strip() and probe.add(cell, 0):
            return index
    return None


def parse_json(
    data: bytes,
    *,
    options: ParseOptions = DEFAULT_OPTIONS,
    provenance: Provenance = NO_PROVENANCE,
    blocklist: bool = True,
) -> ParseResult:
    """Parse a JSON document: ``options.path`` selects the values (see ``feeds.jsonpath``)."""
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e}") from None
    builder = ResultBuilder(provenance, blocklist=blocklist, max_samples=options.max_samples)
    key = options.value_key
    meta = (
        options.first_seen_field,
        options.reference_field,
        options.tags_field,
        options.confidence_field,
    )
    with_meta = any(m is not None for m in meta)
    for index, node in enumerate(jsonpath.select(document, options.path or ""), start=1):
        builder.records += 1
        prov = provenance
        if isinstance(node, dict):
            if key is None:
                builder.reject(index, str(node), "path selects objects; set value_key")
                continue
            value = node.get(key)
            if with_meta:
                fs, ref, tags, conf = (node.get(str(m)) if m is not None else None for m in meta)
                prov = _row_provenance(provenance, fs, ref, tags, conf)
        else:
            value = node
        if not isinstance(value, str):
            builder.reject(index, repr(value), "value is not a string")
            continue
        builder.add(value, index, prov)
    return builder.result()


def parse_spamhaus(
    data: bytes,
    *,
    options: ParseOptions = DEFAULT_OPTIONS,
    provenance: Provenance = NO_PROVENANCE,
    blocklist: bool = True,
) -> ParseResult:
    """Parse Spamhaus DROP/EDROP/DROPv6, as text or as JSON lines with a metadata record."""
    text = decode_text(data)
    builder = ResultBuilder(provenance, blocklist=blocklist, max_samples=options.max_samples)
    if text.lstrip().startswith("{"):
        _spamhaus_jsonl(text, builder, provenance, options)
        return builder.result()
    for number, line in iter_lines(text):
        if line.startswith((";", "#")):
            continue
        builder.records += 1
        value, _, sbl = line.partition(";")
        sbl = sbl.strip()
        prov = replace(provenance, reference=sbl) if sbl else provenance
        builder.add(value, number, prov, only=IndicatorType.CIDR)
    return builder.result()


def _spamhaus_jsonl(
    text: str, builder: ResultBuilder, provenance: Provenance, options: ParseOptions
) -> None:
    for number, line in iter_lines(text):
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            builder.records += 1
            builder.reject(number, line, f"invalid JSON: {e}")
            continue
        if not isinstance(record, dict):
            builder.records += 1
            builder.reject(number, line, "not a JSON object")
            continue
        if record.get("type") == "metadata":
            count = record.get("records")
            if options.check_trailer and isinstance(count, int):
                builder.expected = count
            continue
        builder.records += 1
        cidr = record.get("cidr")
        if cidr is None and "asn" in record:
            builder.ignored += 1
            continue
        if not isinstance(cidr, str):
            builder.reject(number, line, "no 'cidr' member")
            continue
        sbl = record.get("sblid")
        prov = replace(provenance, reference=sbl) if isinstance(sbl, str) else provenance
        builder.add(cidr, number, prov, only=IndicatorType.CIDR)


Parser = Callable[..., ParseResult]

_PARSERS: dict[str, Parser] = {
    "lines": parse_lines,
    "hosts": parse_hosts,
    "csv": parse_csv,
    "json": parse_json,
    "spamhaus": parse_spamhaus,
}


def parse(
    fmt: str,
    data: bytes,
    *,
    options: ParseOptions = DEFAULT_OPTIONS,
    provenance: Provenance = NO_PROVENANCE,
    blocklist: bool = True,
    now: datetime | None = None,
) -> ParseResult:
    """Parse a body in the named format; ``now`` is required by ``stix`` only."""
    if fmt == "stix":
        if now is None:
            raise ValueError("the stix format needs the current time (now=...)")
        return stix.parse_stix(
            data, now=now, options=options, provenance=provenance, blocklist=blocklist
        )
    try:
        parser = _PARSERS[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}") from None
    return parser(data, options=options, provenance=provenance, blocklist=blocklist)
