"""Tests of feeds.spec: the feed definition model and durations."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from feeds.spec import FeedSpec, check_unique_names, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1d", 86400.0),
        ("500ms", 0.5),
        ("45", 45.0),
        (90, 90.0),
        (1.5, 1.5),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    """Durations are seconds or unit-suffixed text, summed over parts."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10x", "m10", "-5s", "0", "1h 30m"])
def test_parse_duration_rejects(text: str) -> None:
    """Unknown units, zero, negative and malformed durations raise ValueError."""
    with pytest.raises(ValueError):
        parse_duration(text)


def test_gateway_contract_shape() -> None:
    """The documented gateway config entry validates to the expected spec."""
    spec = FeedSpec.model_validate(
        {"name": "local-ips", "url": "feed-ips.txt", "format": "lines", "period": "10m"}
    )
    assert (spec.period, spec.kind, spec.subdomains, spec.enabled) == (
        600.0,
        "blocklist",
        True,
        True,
    )
    assert not spec.is_remote


def test_errors_carry_key_paths_when_embedded() -> None:
    """Embedded in another model, a misspelt key is reported with its full path."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        feeds: list[FeedSpec]

    with pytest.raises(ValidationError) as err:
        Config.model_validate(
            {"feeds": [{"name": "x", "url": "a.txt", "format": "lines", "perod": "1h"}]}
        )
    assert err.value.errors()[0]["loc"] == ("feeds", 0, "perod")


def test_catalog_reference_with_overrides() -> None:
    """catalog: NAME fills the definition; keys beside it override; name defaults."""
    spec = FeedSpec.model_validate(
        {"catalog": "urlhaus", "period": "30m", "options": {"column": 3}}
    )
    assert spec.name == "urlhaus" and spec.format == "csv" and spec.period == 1800.0
    assert spec.options.column == 3 and spec.options.tags_field == "tags"
    with pytest.raises(ValidationError, match="unknown catalog feed 'nope'"):
        FeedSpec.model_validate({"catalog": "nope"})


@pytest.mark.parametrize(
    "change",
    [
        {"url": "ftp://x/y"},
        {"format": "xml"},
        {"kind": "greylist"},
        {"confidence": 101},
        {"period": "0s"},
        {"name": "bad name"},
        {"options": {"colum": 1}},
    ],
)
def test_invalid_specs_rejected(change: dict[str, object]) -> None:
    """Bad values and unknown keys (also inside options) are validation errors."""
    data = {"name": "x", "url": "a.txt", "format": "lines", **change}
    with pytest.raises(ValidationError):
        FeedSpec.model_validate(data)


def test_spec_is_frozen_and_names_unique() -> None:
    """Specs are immutable; duplicate names are refused."""
    spec = FeedSpec(name="a", url="a.txt", format="lines")
    with pytest.raises(ValidationError):
        spec.name = "b"  # type: ignore[misc]
    with pytest.raises(ValueError, match="duplicate"):
        check_unique_names([spec, spec])
