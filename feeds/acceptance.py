"""Update acceptance: should a new feed body replace the last good one? Pure judgements.

An update is refused, with the reason returned, when (in this order):

1. the body is empty (or only whitespace), unless the feed allows empty;
2. the body is HTML (an error page or login wall served with 200) where data was expected;
3. after parsing: a trailer count disagrees with the rows read (a cut download);
4. more than ``max_rejected_ratio`` of the rows were malformed ("mostly unparseable");
5. no indicator is left, unless the feed allows empty;
6. the entry count shrinks by more than ``max_shrink`` of the previous count (0.5: refuse an
   update that loses more than half the list).

``None`` means accept. The caller keeps the last good data and reports the reason otherwise.
"""

from __future__ import annotations

from feeds.result import ParseResult

HTML_SNIFF_BYTES = 1024
_HTML_MARKERS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<title")


def looks_like_html(body: bytes, content_type: str | None = None) -> bool:
    """True when a body is an HTML page (by media type or by its first bytes)."""
    if content_type and content_type.split(";", 1)[0].strip().lower() in (
        "text/html",
        "application/xhtml+xml",
    ):
        return True
    head = body[:HTML_SNIFF_BYTES].lstrip().lower()
    return head.startswith(b"<") and any(marker in head for marker in _HTML_MARKERS)


def classify_body(
    body: bytes, *, content_type: str | None = None, allow_empty: bool = False
) -> str | None:
    """Why a raw body must not be parsed at all, or None."""
    if not body.strip():
        return None if allow_empty else "empty body"
    if looks_like_html(body, content_type):
        return "HTML page where feed data was expected"
    return None


def classify_result(
    result: ParseResult,
    previous_entries: int | None,
    *,
    max_shrink: float,
    max_rejected_ratio: float,
    allow_empty: bool = False,
) -> str | None:
    """Why a parsed update must not replace the last good data, or None."""
    if result.truncated:
        return f"truncated: trailer says {result.expected} entries, read {result.records}"
    if result.records and result.rejected / result.records > max_rejected_ratio:
        return f"mostly unparseable: {result.rejected} of {result.records} rows rejected"
    entries = len(result.indicators)
    if entries == 0:
        return None if allow_empty else "no indicators in the update"
    if previous_entries and entries < previous_entries * (1.0 - max_shrink):
        return (
            f"shrank from {previous_entries} to {entries} entries "
            f"(more than {max_shrink:.0%}; limit max_shrink)"
        )
    return None
