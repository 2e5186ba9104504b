"""Tests of feeds.acceptance: which updates may replace the last good data."""

from __future__ import annotations

import pytest

from feeds.acceptance import classify_body, classify_result, looks_like_html
from feeds.indicator import Indicator, IndicatorSet, IndicatorType
from feeds.result import ParseResult


def _result(
    n: int, *, records: int | None = None, rejected: int = 0, expected: int | None = None
) -> ParseResult:
    inds = IndicatorSet(Indicator(IndicatorType.IP, f"1.2.{i // 256}.{i % 256}") for i in range(n))
    return ParseResult(
        inds, records=records if records is not None else n, rejected=rejected, expected=expected
    )


LIMITS = {"max_shrink": 0.5, "max_rejected_ratio": 0.5}


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (b"<!DOCTYPE html><html><body>Error</body></html>", None),
        (b"  \n<html><head><title>Login</title></head>", None),
        (b"1.2.3.4\n", "text/html; charset=utf-8"),
    ],
)
def test_html_pages_are_detected(body: bytes, ctype: str | None) -> None:
    """HTML error pages and login walls are recognised by content or media type."""
    assert looks_like_html(body, ctype)
    assert classify_body(body, content_type=ctype) == "HTML page where feed data was expected"


def test_data_is_not_html() -> None:
    """Feed data, including XML-ish STIX text, is not mistaken for HTML."""
    assert not looks_like_html(b"# <b>comment</b>\n1.2.3.4\n")
    assert classify_body(b"1.2.3.4\n") is None


def test_empty_body_refused_unless_allowed() -> None:
    """An empty body never clears a list unless the feed allows empty."""
    assert classify_body(b" \n") == "empty body"
    assert classify_body(b"", allow_empty=True) is None


def test_result_rules() -> None:
    """Truncation, mostly-unparseable, empty and shrink each have their reason."""
    assert "truncated" in (classify_result(_result(5, expected=10), None, **LIMITS) or "")
    assert "mostly unparseable" in (
        classify_result(_result(4, records=10, rejected=6), None, **LIMITS) or ""
    )
    assert classify_result(_result(0), 10, **LIMITS) == "no indicators in the update"
    assert classify_result(_result(0), 10, allow_empty=True, **LIMITS) is None
    assert "shrank from 100 to 40" in (classify_result(_result(40), 100, **LIMITS) or "")


def test_acceptable_updates() -> None:
    """Growth, a modest shrink and a first load are accepted."""
    assert classify_result(_result(200), 100, **LIMITS) is None
    assert classify_result(_result(60), 100, **LIMITS) is None
    assert classify_result(_result(1), None, **LIMITS) is None
    assert classify_result(_result(10, records=12, rejected=2), 10, **LIMITS) is None
